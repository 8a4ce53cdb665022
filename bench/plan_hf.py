"""The planner's tracker and clock on transformers' own Llama training step: an external check.

The planner (``longtrain-plan``) runs longtrain's step on fake tensors under
:class:`~longtrain.plan.tracker.StepTracker`; so far its only references are longtrain's own real
steps. This script runs the same tracker, with the same GPU table and roofline clock, on the step
``../shared/bench/hf_baseline.py`` measures on a GPU, so that the baseline's measured peak and
tokens/s check the planner on code longtrain did not write:

- ``LlamaForCausalLM`` of the Llama-3.2-1B shape (tied embeddings), weights in bf16 (no autocast,
  no fp32 master weights), SDPA attention, non-reentrant gradient checkpointing of every decoder
  layer, batch 1, random tokens (labels = inputs);
- mode ``hf``: ``model(input_ids=ids, labels=ids).loss.backward()`` (transformers' own loss: full
  logits, upcast to fp32, cross-entropy); mode ``liger``: the final hidden states through Liger's
  fused linear cross-entropy (``h[:, :-1]`` against ``ids[:, 1:]``), planned with the torch
  stand-in of the same algorithm in ``bench/liger_standin.py`` (Liger's chunking is stated there,
  with where it was read);
- ``torch.optim.AdamW(lr=1e-5, fused=True)`` (bf16 state), stepped after the backward, then
  ``zero_grad(set_to_none=True)``. The optimizer state is made before the planned step (one step on
  zero gradients, then the tracker restarts), so the plan is of a steady-state step as the
  baseline's second repeat.

As the planner does, the model is built and stepped on CPU fake tensors standing for the GPU
(``FakeTensorMode(allow_non_fake_inputs=True)``, the tracker inside it, ``StepTracker(gpu.bf16_flops,
gpu.hbm_bytes_per_s, fake=True)``); integer bookkeeping (token ids, positions) runs for real.

Attention: SDPA is pinned to its flash backend (``torch.nn.attention.sdpa_kernel``) for the whole
step, the recomputation in the backward included. On these CPU tensors that is
``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, whose outputs match CUDA's
flash (output, fp32 log-sum-exp ``[B, H, S]``, native GQA: K and V keep their 8 heads), so the math
path's ``S x S`` scores never appear; with a GPU target the tracker adds the CUDA flash backward's
workspace to that op (:func:`longtrain.plan.flops.flash_backward_workspace`: fp32 dQ accumulator and
K/V gradients expanded to the 32 query heads). A GPU whose SDPA picks cuDNN instead (recent torch
prefers it on Hopper) runs a kernel this plan does not model.

One JSON line per (mode, sequence length): ``planned_peak_gib`` (live tensor bytes at the peak, the
planner's definition; compare with ``torch.cuda.max_memory_allocated``), ``fits`` (peak within the
GPU's memory; the baseline would report ``ok: false`` otherwise), ``planned_step_s`` (the roofline
time of every op: forward, backward with recomputation, optimizer), ``planned_tokens_per_s``,
``planned_hfu`` (the FLOPs executed, recomputation included, over the roofline time and the GPU's
peak), ``planned_flops`` and the exact count expected for this step (:func:`expected_flops`), the peak's
phase and what is alive there (params, grads, optimizer, activations; the largest tensors),
``plan_seconds`` (this CPU's time to make the plan). Everything is a prediction.

Usage:
  python bench/plan_hf.py                          # H100, both modes, 16K..256K (minutes on 2 cores)
  python bench/plan_hf.py --gpu h200 --modes liger --seqs 262144
  python bench/plan_hf.py --dry-run                # a tiny Llama at 2 short lengths: seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ siblings, however the script is run
from liger_standin import fused_linear_cross_entropy, liger_chunk_size  # noqa: E402

SHAPES: Dict[str, dict] = {  # Llama-3.2-1B as hf_baseline.py has it; "tiny" for the dry run
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
}
MODES = ("hf", "liger")
SEQS = (16384, 32768, 65536, 131072, 262144)
DRY_SEQS = (256, 1024)
TOP_TENSORS = 6
"""How many of the largest storages alive at the peak a row lists."""


def build(shape: str):
    """``LlamaForCausalLM`` of ``shape`` as hf_baseline.py builds it: bf16 weights, SDPA, non-reentrant
    checkpointing, train mode. Made in bf16 directly (a module of fake parameters cannot be
    converted by ``.to``; the weights end in the same dtype)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=1 << 23, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def forward_backward(model, ids: torch.Tensor, mode: str, before_backward: Callable[[], None] = lambda: None) -> None:
    """hf_baseline.py's ``forward_backward`` for ``hf`` and ``liger`` (Liger through the stand-in),
    calling ``before_backward`` between the two. The Python references are the baseline's: in
    ``hf`` the model's output (and its logits) dies before the backward, only the loss is held; in
    ``liger`` the final hidden states ``h`` stay alive through the backward."""
    if mode == "hf":
        loss = model(input_ids=ids, labels=ids).loss
    elif mode == "liger":
        h = model.model(input_ids=ids).last_hidden_state
        loss = fused_linear_cross_entropy(model.lm_head.weight, h[:, :-1].reshape(-1, h.shape[-1]),
                                          ids[:, 1:].reshape(-1))
    else:
        raise ValueError(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    before_backward()
    loss.backward()


def layer_params(c: dict) -> int:
    """Matmul parameters of one decoder layer (q, k, v, o, gate, up, down; no biases)."""
    h, d = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    return (2 * h * c["num_attention_heads"] * d + 2 * h * c["num_key_value_heads"] * d
            + 3 * h * c["intermediate_size"])


def expected_flops(shape: str, seq: int, mode: str) -> int:
    """The FLOPs this step does, counted as the tracker counts them (matmuls and attention, batch 1).

    Per token, a decoder layer's matmuls cost 2P forward, 4P backward (input and weight gradients)
    and, recomputed under checkpointing, 2P again less the down projection (2 H I): non-reentrant
    checkpointing stops recomputing once every tensor the backward needs is back, and nothing
    needs the down projection's output. Causal attention (half the S x S pairs, as the kernels
    compute) costs 2 H_q S^2 D forward, twice that backward, and is recomputed: 8 H_q S^2 D per
    layer. The LM head costs 6 V H per token: ``hf`` on all S tokens, ``liger`` on S - 1
    (logits, input gradient and weight gradient, all in the forward).
    """
    c = SHAPES[shape]
    h, heads = c["hidden_size"], c["num_attention_heads"]
    d, layers = h // heads, c["num_hidden_layers"]
    per_token = layers * (8 * layer_params(c) - 2 * h * c["intermediate_size"])
    attention = layers * 8 * heads * seq * seq * d
    head_tokens = seq if mode == "hf" else seq - 1
    return per_token * seq + attention + 6 * c["vocab_size"] * h * head_tokens


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (a tiny shape's step is microseconds)."""
    return float(f"{x:.{digits}g}")


def _top_tensors(tracker, kinds: Dict[int, str]) -> List[dict]:
    """The largest storages alive at the tracker's peak: bytes, kind, op, shape, dtype, phase."""
    rows = []
    for serial, (size, where) in tracker.peak_snapshot.items():
        if where != "device":
            continue
        op, shape, dtype, phase = tracker.origin.get(serial, ("workspace of the running op", (), "",
                                                             tracker.peak_phase))
        rows.append({"gib": round(size / 2**30, 3), "kind": kinds.get(serial, "activations"), "op": op,
                     "shape": list(shape), "dtype": dtype, "made_in": phase})
    return sorted(rows, key=lambda r: -r["gib"])[:TOP_TENSORS]


def plan_point(shape: str, mode: str, seq: int, gpu, fake: bool = True) -> dict:
    """Plan one steady-state step of ``mode`` at ``seq`` tokens for ``gpu``; one JSON row.

    ``fake=False`` runs the same step on real CPU tensors under the same tracker (the tests compare
    the two: the fake step must account exactly what the real one allocates)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longtrain.plan.tracker import StepTracker

    start = time.perf_counter()
    tracker = StepTracker(gpu.bf16_flops, gpu.hbm_bytes_per_s, fake=fake)
    tensors = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    torch.manual_seed(0)
    with tensors, tracker, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model = build(shape)
        params = list(model.parameters())  # tied: the embedding and the LM head are one tensor
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        for p in params:  # steady state: AdamW makes its state in its first step
            p.grad = torch.zeros_like(p)
        opt.step()
        model.zero_grad(set_to_none=True)
        states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        ids = torch.randint(0, model.config.vocab_size, (1, seq))
        tracker.phase = "forward"
        tracker.start_step()
        forward_backward(model, ids, mode, lambda: setattr(tracker, "phase", "backward"))
        grads = [p.grad for p in params if p.grad is not None]
        grad_serials = tracker.serials(grads)
        tracker.phase = "optimizer"
        opt.step()
        model.zero_grad(set_to_none=True)
        kinds = {**{s: "params" for s in tracker.serials(params)}, **{s: "grads" for s in grad_serials},
                 **{s: "optimizer" for s in tracker.serials(states)}}
    by_kind = {k: 0 for k in ("params", "grads", "optimizer", "activations")}
    for serial, (size, where) in tracker.peak_snapshot.items():
        if where == "device":
            by_kind[kinds.get(serial, "activations")] += size
    c = SHAPES[shape]
    expected = expected_flops(shape, seq, mode)
    row = {"mode": mode, "seq": seq, "gpu": gpu.name, "shape": shape,
           "planned_peak_gib": round(tracker.peak / 2**30, 3), "planned_peak_bytes": tracker.peak,
           "fits": tracker.peak <= gpu.memory_bytes,
           "planned_tokens_per_s": round(seq / tracker.time_s, 1) if tracker.time_s else 0.0,
           "planned_step_s": _sig(tracker.time_s), "planned_compute_s": _sig(tracker.compute_s),
           "planned_memory_s": _sig(tracker.memory_s),
           # executed FLOPs (recomputation included) over the roofline time: hardware, not model, FLOPs
           "planned_hfu": round(tracker.flops / tracker.time_s / gpu.bf16_flops, 3) if tracker.time_s else 0.0,
           "planned_flops": tracker.flops, "expected_flops": expected, "peak_phase": tracker.peak_phase,
           "peak_by_kind_gib": {k: _sig(v / 2**30) for k, v in by_kind.items()},
           "flash_backward_workspace_gib": _sig(tracker.workspace_peak / 2**30),
           "largest_at_peak": _top_tensors(tracker, kinds),
           "plan_seconds": round(time.perf_counter() - start, 1)}
    if mode == "liger":
        row["liger_chunk_tokens"] = liger_chunk_size(seq - 1, c["hidden_size"], c["vocab_size"])
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default="h100", help="target GPU of longtrain.plan.gpus (h100, h200, a100, b200)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seqs", nargs="+", type=int, default=None, help=f"sequence lengths (default {SEQS})")
    p.add_argument("--shape", default="llama1b", choices=sorted(SHAPES))
    p.add_argument("--dry-run", action="store_true", help=f"tiny shape at {DRY_SEQS}: seconds on a CPU")
    a = p.parse_args(argv)
    import transformers

    from longtrain.config import ConfigError
    from longtrain.plan.gpus import get_gpu

    try:
        gpu = get_gpu(a.gpu)
    except ConfigError as e:
        p.error(str(e))  # one line naming --gpu and the choices, exit code 2
    shape = "tiny" if a.dry_run else a.shape
    seqs = a.seqs or (DRY_SEQS if a.dry_run else SEQS)
    for mode in a.modes:
        for seq in seqs:
            row = plan_point(shape, mode, seq, gpu)
            row.update(torch=torch.__version__, transformers=transformers.__version__)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
