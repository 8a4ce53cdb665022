"""Throughput and peak memory of one longtrain training step at growing sequence lengths.

For each memory mode it doubles the sequence length from --start until the step runs out of
memory (or --max) and prints one JSON line per trial: step time, tokens/s, MFU and peak memory
for forward + backward + AdamW step at batch size 1, random weights and tokens. It uses the same
model, chunked LM-head loss and optimizer as the trainer, so its numbers compare directly with
``../shared/bench/hf_baseline.py`` run on the same GPU.

Modes: ``checkpointing`` (each layer recomputed in the backward), ``streambp`` (the backward
streamed along the sequence in ``--streambp-chunk`` tokens, :mod:`longtrain.memory.streambp`),
``streambp_offload`` (the same, saved layer inputs in pinned host memory) and ``none``.

The weights are made on the device (no host copy of the model), ``--layers`` cuts the depth (the
planner's check at reduced depth), attention runs on ``--attention-backend``'s kernels, and AdamW's
state is created before the first timed step (as the planner's steady-state step has it), so one
step measures the steady-state peak.

Usage (on a GPU machine):
  python bench/train_step.py --shape llama1b --modes checkpointing streambp streambp_offload --start 8192
On CPU it runs too (tiny shape) as a smoke test: python bench/train_step.py --shape tiny --max 2048
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from longtrain.config import OptimConfig
from longtrain.kernels.attention import LocalAttention
from longtrain.kernels.dispatch import AttentionKernels
from longtrain.memory import apply_checkpointing, apply_streambp, unwrap_layers
from longtrain.models import Transformer, get_model_args
from longtrain.optim.loss import chunked_lm_loss
from longtrain.optim.optimizer import build_optimizer
from longtrain.trainer.metrics import peak_flops_per_device


MODES = ("checkpointing", "streambp", "streambp_offload", "none")


def set_mode(model, mode: str, streambp_chunk: int) -> None:
    """Memory mode of ``model``: gradient checkpointing, StreamBP (optionally offloading the saved
    layer inputs to host memory), or plain backprop."""
    unwrap_layers(model)
    if mode == "checkpointing":
        apply_checkpointing(model)
    elif mode.startswith("streambp"):
        apply_streambp(model, streambp_chunk, offload=mode == "streambp_offload")


def build(shape: str, device: torch.device, layers=None, backend: str = "flash"):
    """(model args, model, AdamW) of ``shape`` (``layers`` deep when given), weights drawn on ``device``,
    attention on ``backend``'s kernels."""
    args = get_model_args(shape, **({} if layers is None else {"num_layers": layers}))
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
        model.init_weights()
    model.set_attention_fn(LocalAttention(AttentionKernels(backend)))
    model.train()
    return args, model, build_optimizer(model, OptimConfig(), device)


def prime(model, opt) -> None:
    """Create AdamW's state (a step on zero gradients) unless it exists: the steady state."""
    if not opt.state:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def trial(model, opt, args, mode, seq, repeats, device, chunk, streambp_chunk=4096):
    ids = torch.randint(0, args.vocab_size, (1, seq + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    set_mode(model, mode, streambp_chunk)
    prime(model, opt)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    row = dict(shape=args_name(args), layers=args.num_layers, mode=mode, seq=seq, ok=True,
               streambp_chunk=streambp_chunk if mode.startswith("streambp") else None)
    try:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with autocast:
                hidden = model.hidden_states(inputs)
            chunked_lm_loss(hidden, model.output_weight, labels, None, chunk).div(seq).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        best = min(times)
        peak = peak_flops_per_device(device)
        row.update(step_s=round(best, 4), tokens_per_s=round(seq / best),
                   mfu=None if peak is None else round(args.flops_per_token(seq) * seq / best / peak, 4),
                   peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None)
    except torch.OutOfMemoryError:
        row["ok"] = False
    opt.zero_grad(set_to_none=True)
    print(json.dumps(row), flush=True)
    return row


def args_name(args) -> str:
    return f"h{args.hidden_size}-L{args.num_layers}-H{args.num_heads}-kv{args.num_kv_heads}-V{args.vocab_size}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama1b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--attention-backend", choices=["auto", "flash", "cudnn"], default="flash")
    p.add_argument("--modes", nargs="+", default=["checkpointing"], choices=MODES)
    p.add_argument("--streambp-chunk", type=int, default=4096, help="tokens per StreamBP backward chunk")
    p.add_argument("--start", type=int, default=8192)
    p.add_argument("--max", type=int, default=1 << 20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=480, help="stop starting new trials after this")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args, model, opt = build(a.shape, device, a.layers, a.attention_backend)
    deadline = time.time() + a.budget_s
    for mode in a.modes:
        seq = a.start
        while seq <= a.max and time.time() < deadline:
            if not trial(model, opt, args, mode, seq, a.repeats, device, a.loss_chunk, a.streambp_chunk)["ok"]:
                break
            seq *= 2


if __name__ == "__main__":
    main()
