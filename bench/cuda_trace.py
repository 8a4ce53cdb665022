"""Every CUDA code path of longtrain traced on fake CUDA tensors, forward and backward, without a GPU.

A developer's check, not a CI step; it needs a CUDA build of torch (no GPU or driver) and refuses
any other torch in one line, exit code 2:  ../cuda-venv/bin/python bench/cuda_trace.py (a venv beside the
checkout; ``LONGTRAIN_CUDA_VENV`` names another)

Each path runs under :mod:`fake_cuda` (fake CUDA tensors, real values for the integer ones), its
backward as ``loss.backward()`` on the Python autograd engine, the models under CUDA bf16 autocast
as the trainer's engine runs them. One JSON line per path: ``forward``/``backward`` ("ok", or the
error's first line and ``*_where``, its innermost longtrain frame), executor calls (deltas of
:data:`KERNEL_STATS`), the aten ops of interest by input dtype, output and gradient shapes and dtypes
(``grads_match``: every leaf got a gradient of its shape and dtype) and the host reads of CUDA
values (``.item()``/``bool()``/``.tolist()``, copies to the host, ops whose output size the host
reads) per phase and call site. Then a summary line; exit code 0 when every path ran both ways.

Passing shows that CUDA's meta functions accepted every call (shapes, dtypes, strides, index
dtypes) at the 1B model's geometry; nothing about values, speed or memory (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

VENV = os.environ.get("LONGTRAIN_CUDA_VENV", "../cuda-venv")
INSTALL = (f"python3 -m venv {VENV} && {VENV}/bin/pip install torch==2.14.1 omegaconf hydra-core safetensors "
           "numpy pyyaml tqdm")
if torch.version.cuda is None:  # before the imports below, which need a CUDA build to mean anything
    print(f"bench/cuda_trace.py needs a CUDA build of torch, not {torch.__version__}: run it as "
          f"{VENV}/bin/python bench/cuda_trace.py (the venv: {INSTALL})", file=sys.stderr)
    sys.exit(2)

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fake_cuda import (aten, balanced_bincount, cuda_autocast_allowed, fake_cuda, python_autograd,  # noqa: E402
                       stand_in_streams)
from longtrain.kernels.attention import LocalAttention  # noqa: E402
from longtrain.kernels.dispatch import KERNEL_STATS, AttentionKernels  # noqa: E402
from longtrain.memory.offload import _SIDE_STREAMS  # noqa: E402
from longtrain.memory.wrappers import apply_checkpointing, apply_streambp  # noqa: E402
from longtrain.models import Transformer, get_model_args  # noqa: E402
from longtrain.models.moe import Experts  # noqa: E402
from longtrain.optim.loss import chunked_lm_loss  # noqa: E402
from longtrain.parallel.ring import RingAttention  # noqa: E402
from longtrain.parallel.sharding import zigzag_indices  # noqa: E402
from longtrain.parallel.ulysses import UlyssesAttention  # noqa: E402

BF16 = torch.bfloat16
LAYERS = 2  # of 16 (llama1b) or 48 (qwen3_30b_a3b): layers run the same code; two show the hand-over
SEQ, DOCS = 8192, (3000, 4000, 1192)  # tokens of the model rows, and their packed documents
OPS = {"_flash_attention_forward", "_flash_attention_backward", "_scaled_dot_product_cudnn_attention",
       "_scaled_dot_product_cudnn_attention_backward", "_grouped_mm", "_fused_rms_norm", "_fused_rms_norm_backward",
       "rms_norm", "mm", "addmm", "addmm_", "bmm", "_safe_softmax"}
# ops whose output size a CUDA kernel must send to the host (repeat_interleave: its Tensor-repeats forms)
SIZE_READS = {"nonzero", "bincount", "masked_select", "_unique2", "unique_consecutive", "repeat_interleave"}


class Tally(TorchDispatchMode):
    """The aten ops of interest (:data:`OPS`, any other attention op) that reach the fake mode, by
    their first input's dtype, and the host reads of CUDA values by longtrain call site. Enter it
    inside :func:`fake_cuda.fake_cuda`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.reads: Counter = Counter()
        self._last_read = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._opname
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in OPS or "attention" in name:
            self.ops[f"{name}[{str(src.dtype)[6:] if src is not None else ''}]"] += 1
        read = src is not None and src.is_cuda and (
            func is aten._local_scalar_dense.default
            or (func is aten._to_copy.default and (kwargs.get("device") or src.device).type == "cpu")
            or (name in SIZE_READS and kwargs.get("output_size") is None and not func._overloadname.endswith("int")))
        read = read or (func is aten.copy_.default and not src.is_cuda and args[1].is_cuda  # blocking copy to host
                        and not (list(args[2:]) or [kwargs.get("non_blocking", False)])[0])
        if read:
            frame = _longtrain_frame()
            where = (id(frame), frame.f_lasti if frame else None)
            if where != self._last_read:  # a .tolist() reads element by element, with no op between
                self.reads[_site(frame)] += 1
            self._last_read = where
        elif func is not torch.ops.prim.device.default:
            self._last_read = None
        return func(*args, **kwargs)


def _longtrain_frame():
    """The innermost frame of longtrain's code on the stack, or None."""
    frame = sys._getframe(1)
    while frame is not None and "/longtrain/" not in frame.f_code.co_filename:
        frame = frame.f_back
    return frame


def _site(frame) -> str:
    """``file:line`` of a frame (or a traceback entry), relative to the repository."""
    if frame is None:
        return "outside longtrain"
    path, line = (frame.f_code.co_filename, frame.f_lineno) if hasattr(frame, "f_code") else (frame.filename,
                                                                                              frame.lineno)
    return f"{Path(path).relative_to(REPO) if path.startswith(str(REPO)) else path}:{line}"


def _error(exc: BaseException) -> Tuple[str, str]:
    """The exception's first line, and where it rose: the innermost longtrain frame, else the last."""
    text = str(exc).strip().splitlines()
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if "/longtrain/" in f.filename] or frames
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}", _site(mine[-1])


def _describe(t) -> str:
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else repr(t)


@dataclass
class Case:
    """One traced path: ``forward() -> (outputs, scalar loss)``; ``leaves`` must all get ``.grad``."""

    forward: Callable[[], Tuple[Dict[str, torch.Tensor], torch.Tensor]]
    leaves: Dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)
    streams: bool = False  # runs under fake_cuda.stand_in_streams (activation offload)


def trace(name: str, build: Callable[[], Case]) -> dict:
    """Build one path and run it forward, then backward, each phase under a fresh :class:`Tally`.

    Args:
        name: the row's ``path``.
        build: makes the :class:`Case` (inside the fake mode); its failure is the forward's.

    Returns:
        The JSON row (module docstring); a failing phase is recorded, never raised.
    """
    row: dict = {"path": name}
    t0 = time.perf_counter()
    KERNEL_STATS.reset()
    KERNEL_STATS.available["cuda:0"] = True  # cuDNN's real probe compares values, which fake tensors lack
    calls, reads, ops = {}, {}, {}
    try:
        case = build()
        row.update(case.info)
        with stand_in_streams() if case.streams else contextlib.nullcontext() as streams:
            for phase in ("forward", "backward"):
                before = dict(KERNEL_STATS.calls)
                with Tally() as tally:
                    try:
                        if phase == "forward":
                            outputs, loss = case.forward()
                            row["outputs"] = {k: _describe(v) for k, v in outputs.items()}
                        else:
                            with python_autograd():
                                loss.backward()
                        row[phase] = "ok"
                    except Exception as exc:  # noqa: BLE001 - a failing path is this script's finding
                        row[phase], row[f"{phase}_where"] = _error(exc)
                calls[phase] = {k: v - before[k] for k, v in KERNEL_STATS.calls.items() if v != before[k]}
                ops[phase], reads[phase] = dict(tally.ops), dict(tally.reads)
                if row[phase] != "ok":
                    break
            if streams is not None:
                row["stream_calls"] = dict(streams)
                _SIDE_STREAMS.clear()  # offload caches its side stream: no stand-in may outlive the block
        if row.get("backward") == "ok":
            row["grads_match"] = all(t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
                                     for t in case.leaves.values())
            shown = case.leaves if len(case.leaves) <= 4 else {}
            row["grads"] = {k: _describe(t.grad) for k, t in shown.items()} or \
                f"{sum(t.grad is not None for t in case.leaves.values())}/{len(case.leaves)} parameters"
    except Exception as exc:  # noqa: BLE001 - the build failed
        row["forward"], row["forward_where"] = _error(exc)
    row.setdefault("backward", "not run")
    row.update(executor_calls=calls, ops=ops,
               host_reads={p: sum(r.values()) for p, r in reads.items()}, host_read_sites=reads,
               cudnn_disabled=dict(KERNEL_STATS.disabled), seconds=round(time.perf_counter() - t0, 2))
    return row


# ---------------------------------------------------------------------------- the paths
def _qkv(batch: int, seq: int, heads: int = 32, kv_heads: int = 8, dim: int = 64, dtype=BF16):
    """q, k, v leaves of the 1B model's attention geometry (GQA 32/8, d 64) on fake CUDA."""
    shapes = ((batch, seq, heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim))
    return [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes]


def _docs(batch: int, lengths=DOCS) -> torch.Tensor:
    """[batch, sum(lengths)] packed-document ids on CUDA (with values: built from integers)."""
    row = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return row.expand(batch, -1).contiguous().to("cuda")


def _attention_case(fn: Callable, q, k, v, info=None) -> Case:
    def forward():
        out = fn(q, k, v)
        return {"out": out}, out.float().square().mean()
    return Case(forward, {"dq": q, "dk": k, "dv": v}, info or {})


def _block_case(backend: str, layout: str) -> Case:
    """One block through ``AttentionKernels(backend).attention``: a ring's diagonal (causal), an
    earlier block (full), or zigzag shards of two ranks with packed documents."""
    kernels = AttentionKernels(backend)
    seq = 4096
    if layout == "zigzag_docs":  # rank 0's queries against rank 1's keys of an 8192-token ring
        q_idx, k_idx = zigzag_indices(2 * seq, 2, 0).cuda(), zigzag_indices(2 * seq, 2, 1).cuda()
        docs = _docs(2, (2500, 3500, 2192))
        q_doc, k_doc = docs[:, q_idx], docs[:, k_idx]
    else:
        k_idx = torch.arange(seq, device="cuda")
        q_idx = k_idx + (seq if layout == "full" else 0)
        q_doc = k_doc = None
    q, k, v = _qkv(2, seq)
    route = kernels.route(q, k, v, q_idx, k_idx, q_doc, k_doc, 0.125)
    info = {"route": route.path, "kind": route.kind,
            "segments": None if route.segments is None else len(route.segments)}
    return _attention_case(lambda *t: kernels.attention(*t, q_idx, k_idx, q_doc, k_doc, 0.125), q, k, v, info)


def _local_case(backend: str, docs: bool, dtype=BF16) -> Case:
    """Whole-sequence local attention (``LocalAttention(AttentionKernels(backend))``), 2 x 8192 tokens."""
    attn, doc_ids = LocalAttention(AttentionKernels(backend)), _docs(2) if docs else None
    return _attention_case(lambda q, k, v: attn(q, k, v, doc_ids=doc_ids), *_qkv(2, SEQ, dtype=dtype))


def _sp_case(kind: str, backend: str, docs: bool) -> Case:
    """Ring attention (zigzag, one rank: no process group) or Ulysses (degree 1) over local attention."""
    kernels = AttentionKernels(backend)
    attn = RingAttention(None, kernels=kernels) if kind == "ring" else UlyssesAttention(
        None, inner=LocalAttention(kernels), num_heads=32, num_kv_heads=8)
    doc_ids = _docs(2) if docs else None
    return _attention_case(lambda q, k, v: attn(q, k, v, doc_ids=doc_ids), *_qkv(2, SEQ))


def _experts_case() -> Case:
    """Qwen3-30B-A3B's routed experts (128, hidden 2048, expert 768) on 8192 sorted assignments in
    bf16: ``torch._grouped_mm`` forward and backward (counts made up: balanced)."""
    args = get_model_args("qwen3_30b_a3b")
    with torch.device("cuda"):
        experts = Experts(args.num_experts, args.hidden_size, args.expert_size)
    for name, p in list(experts.named_parameters()):  # .to(BF16) cannot swap fake parameters (weak references)
        setattr(experts, name, torch.nn.Parameter(0.02 * torch.randn_like(p, dtype=BF16)))
    x = torch.randn(8192, args.hidden_size, device="cuda", dtype=BF16, requires_grad=True)
    counts = balanced_bincount(x[:, 0], minlength=args.num_experts).cuda()

    def forward():
        y = experts(x, counts)
        return {"y": y}, y.float().square().mean()
    return Case(forward, {"dx": x, **dict(experts.named_parameters())})


def _model_case(shape: str, mode: str, backend: str, docs: bool) -> Case:
    """``shape`` cut to :data:`LAYERS` layers, fp32 weights, under CUDA bf16 autocast as the trainer's
    engine runs it: ``hidden_states`` then ``chunked_lm_loss`` (4096-token chunks), then the backward;
    ``mode``: plain, checkpointing, streambp (2048-token chunks) or streambp_offload."""
    args = get_model_args(shape, num_layers=LAYERS)
    with torch.device("cuda"):
        model = Transformer(args)
    model.init_weights()
    model.set_attention_fn(LocalAttention(AttentionKernels(backend)))
    if mode == "checkpointing":
        apply_checkpointing(model)
    elif mode.startswith("streambp"):
        apply_streambp(model, 2048, offload=mode == "streambp_offload")
    ids = torch.randint(0, args.vocab_size, (1, SEQ), device="cuda")
    doc_ids = _docs(1) if docs else None
    pos = torch.cat([torch.arange(n) for n in DOCS])[None].cuda() if docs else None
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100, device="cuda")], dim=1)
    weights = (labels != -100).float() / SEQ

    def forward():
        with torch.autocast("cuda", dtype=BF16):
            hidden = model.hidden_states(ids, position_ids=pos, doc_ids=doc_ids)
        loss = chunked_lm_loss(hidden, model.output_weight, labels, weights, chunk_size=4096)
        return {"hidden": hidden, "loss": loss}, loss
    return Case(forward, dict(model.named_parameters()), streams=mode == "streambp_offload")


PATHS: List[Tuple[str, Callable[..., Case], tuple]] = [  # (name, builder, its arguments), in the order printed
    *[(f"blocks/{backend}/{layout}", _block_case, (backend, layout))
      for backend, layouts in (("flash", ("causal", "full", "zigzag_docs")), ("cudnn", ("causal", "full")))
      for layout in layouts],
    ("local/flash/packed_docs", _local_case, ("flash", True)),
    ("local/cudnn/one_doc", _local_case, ("cudnn", False)),
    ("local/cudnn/packed_docs", _local_case, ("cudnn", True)),
    ("local/fp32_sdpa/packed_docs", _local_case, ("flash", True, torch.float32)),
    ("ring/flash/packed_docs", _sp_case, ("ring", "flash", True)),
    ("ring/cudnn/one_doc", _sp_case, ("ring", "cudnn", False)),
    ("ulysses/flash/packed_docs", _sp_case, ("ulysses", "flash", True)),
    ("moe/experts_grouped_mm", _experts_case, ()),
    *[(f"model/qwen3_30b_a3b/{mode}/flash/packed_docs", _model_case, ("qwen3_30b_a3b", mode, "flash", True))
      for mode in ("plain", "streambp")],
    *[(f"model/llama1b/{mode}/{backend}/{'packed_docs' if docs else 'one_doc'}", _model_case,
       ("llama1b", mode, backend, docs))
      for backend, docs in (("flash", True), ("cudnn", False))
      for mode in ("plain", "checkpointing", "streambp", "streambp_offload")],
]


def main() -> int:
    """Trace every path of :data:`PATHS`, printing its row as it ends, then the summary.

    Returns:
        The exit code: 0 when every path ran forward and backward, else 1.
    """
    t0 = time.perf_counter()
    rows = []
    with fake_cuda({aten.bincount.default: balanced_bincount}), cuda_autocast_allowed():
        for name, build, args in PATHS:
            rows.append(trace(name, functools.partial(build, *args)))
            print(json.dumps(rows[-1]), flush=True)
    failed = [r["path"] for r in rows if r["forward"] != "ok" or r["backward"] != "ok"]
    print(json.dumps({"summary": True, "paths": len(rows), "forward_ok": sum(r["forward"] == "ok" for r in rows),
                      "backward_ok": sum(r["backward"] == "ok" for r in rows), "failed": failed,
                      "torch": torch.__version__, "model_layers": LAYERS,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
