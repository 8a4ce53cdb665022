"""Causal attention forward + backward throughput: longtrain's kernels against torch SDPA.

For each sequence length and document layout (one document, or packed documents of random
lengths averaging S/8) it times forward + backward of:

- ``local``: :class:`longtrain.kernels.attention.LocalAttention`, the entry point every layer calls,
  on the kernels of ``--block-backend``;
- ``block``: the block kernels every other caller (ring blocks, StreamBP chunks) runs,
  :class:`longtrain.kernels.dispatch.AttentionKernels` of ``--block-backend``, on the whole sequence
  as one block (forward with lse, then the block backward from that lse): on CUDA flash
  attention's varlen ops, or cuDNN for dense blocks where chosen (each row reports ``fallbacks``,
  the block calls that fell back to the reference: 0 expected, and the calls per executor);
- ``block_ref``: the plain-torch reference block kernels, for comparison (slow; opt-in);
- ``sdpa``: the baseline, ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
  (native GQA) on the same tensors; with packed documents one call per document, since a dense
  S x S mask is not an option at 128K (it alone would take S^2 bytes = 16 GiB).

FLOP convention (B batch, Hq query heads, D head dim; GQA does not change the count): a causal
forward of one document of L tokens is 2 matmuls x 2 FLOP/MAC x L^2/2 visible pairs x Hq x D =
2 L^2 Hq D; the backward is 2.5x the forward (5 matmuls instead of 2); total = 3.5 x forward =
7 B Hq D sum_docs L^2. With packed documents only the within-document pairs count, so TFLOP/s is
useful work and ``ratio_to_sdpa`` (= sdpa ms / impl ms, > 1 means faster than SDPA) compares like
with like. Timing: CUDA events (perf_counter on CPU), ``--warmup`` untimed runs, median of
``--repeats``. Each row: {"impl", "S", "docs", "ms", "fwd_ms", "bwd_ms", "tflops", "ratio_to_sdpa",
"max_err", "ok"}; a row that runs out of memory (or finds no SDPA kernel) has ok=false, its error
and null timings.

Accuracy: every row's output and input gradients are compared with SDPA's on the same tensors
(``max_err``: the largest of ``max |x - x_sdpa| / (max |x_sdpa| + 1)`` over out, dq, dk, dv); a row
past ``--tol`` (default 2e-2: bf16 keeps ~3 significant digits, and both sides accumulate in fp32)
has ok=false and says so, so a wrong kernel at scale cannot pass as a fast one. ``--sdpa-backend`` pins SDPA (the baseline, and ``local``, which calls it) to one backend
for every row; not every backend takes native GQA (``--kv-heads 32`` gives plain multi-head).

Usage (one GPU, bf16):
  python bench/attention_kernels.py --seqs 8192 16384 32768 65536 131072
CPU smoke test (tiny):
  python bench/attention_kernels.py --device cpu --seqs 256 512 --heads 4 --kv-heads 2 --head-dim 16 \
      --dtype fp32 --warmup 0 --repeats 1
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longtrain.kernels.attention import LocalAttention
from longtrain.kernels.blocks import reference_block_backward, reference_block_forward
from longtrain.kernels.dispatch import KERNEL_STATS, PATHS, AttentionKernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def packed_documents(batch: int, seq_len: int, mean_len: int, seed: int = 0) -> Tuple[torch.Tensor, List[List[int]]]:
    """Document ids [B, S] (int64) and each row's document lengths; lengths uniform in [1, 2*mean-1]."""
    gen = torch.Generator().manual_seed(seed)
    ids, lengths = [], []
    for _ in range(batch):
        row: List[int] = []
        while sum(row) < seq_len:
            row.append(int(torch.randint(1, 2 * mean_len, (1,), generator=gen)))
        row[-1] -= sum(row) - seq_len
        lengths.append(row)
        ids.append(torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)))
    return torch.stack(ids), lengths


def causal_flops(num_heads: int, head_dim: int, lengths: List[List[int]]) -> float:
    """Forward + backward FLOPs: 3.5 x (2 L^2 Hq D) summed over documents and rows."""
    return 3.5 * 2.0 * num_heads * head_dim * sum(length * length for row in lengths for length in row)


def time_fwd_bwd(fwd: Callable[[], object], bwd: Callable[[object], None], device: torch.device, warmup: int,
                 repeats: int) -> Tuple[float, float]:
    """Median forward and backward milliseconds of ``bwd(fwd())``."""
    for _ in range(warmup):
        bwd(fwd())
    fwd_ms, bwd_ms = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            res = fwd()
            marks[1].record()
            bwd(res)
            marks[2].record()
            torch.cuda.synchronize(device)
            fwd_ms.append(marks[0].elapsed_time(marks[1]))
            bwd_ms.append(marks[1].elapsed_time(marks[2]))
        else:
            t0 = time.perf_counter()
            res = fwd()
            t1 = time.perf_counter()
            bwd(res)
            t2 = time.perf_counter()
            fwd_ms.append(1e3 * (t1 - t0))
            bwd_ms.append(1e3 * (t2 - t1))
        del res
    return statistics.median(fwd_ms), statistics.median(bwd_ms)


def make_impl(name: str, q_bshd, k_bshd, v_bshd, dout_bshd, doc_ids: Optional[torch.Tensor],
              lengths: List[List[int]], kernels: AttentionKernels):
    """(forward, backward) closures of one implementation on these inputs; the backward returns
    (dq, dk, dv)."""
    leaves = (q_bshd, k_bshd, v_bshd)

    def autograd_bwd(out):
        return torch.autograd.grad(out, leaves, dout_bshd)

    if name == "local":
        local = LocalAttention(kernels)
        return (lambda: local(q_bshd, k_bshd, v_bshd, doc_ids)), autograd_bwd
    if name == "sdpa":
        def sdpa_fwd():
            q_bhsd, k_bhsd, v_bhsd = (t.transpose(1, 2) for t in leaves)
            if doc_ids is None:
                return F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, is_causal=True,
                                                      enable_gqa=True).transpose(1, 2)
            rows = []
            for b, row in enumerate(lengths):
                pieces = zip(*(t[b:b + 1].split(row, dim=2) for t in (q_bhsd, k_bhsd, v_bhsd)))
                rows.append(torch.cat([F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                                       for q, k, v in pieces], dim=2))
            return torch.cat(rows, dim=0).transpose(1, 2)
        return sdpa_fwd, autograd_bwd
    if name in ("block", "block_ref"):
        forward, backward = kernels.forward, kernels.backward
        if name == "block_ref":
            forward, backward = reference_block_forward, reference_block_backward
        idx = torch.arange(q_bshd.shape[1], device=q_bshd.device)
        scale = 1.0 / math.sqrt(q_bshd.shape[-1])
        plain = tuple(t.detach() for t in leaves)

        def block_fwd():
            return forward(*plain, idx, idx, doc_ids, doc_ids, scale)

        def block_bwd(res):
            out_bshd, lse_bhs = res
            return backward(dout_bshd, *plain, out_bshd, lse_bhs, idx, idx, doc_ids, doc_ids, scale)
        return block_fwd, block_bwd
    raise ValueError(f"--impls: unknown implementation {name!r}; choose from local, block, block_ref, sdpa")


def max_error(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    """The largest ``max |x - y| / (max |y| + 1)`` over the pairs (out, dq, dk, dv)."""
    return max(((x.float() - y.float()).abs().max() / (y.float().abs().max() + 1.0)).item() for x, y in zip(got, want))


def run_row(impl: str, seq_len: int, docs: str, a, device: torch.device, sdpa_ms: dict,
            kernels: AttentionKernels, sdpa_result: dict) -> dict:
    row = dict(impl=impl, S=seq_len, docs=docs, B=a.batch, Hq=a.heads, Hkv=a.kv_heads, D=a.head_dim,
               dtype=a.dtype, device=str(device), ok=True)
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        dtype = DTYPES[a.dtype]

        def rand(heads):
            return torch.randn(a.batch, seq_len, heads, a.head_dim, generator=gen).to(device, dtype)
        q_bshd, k_bshd, v_bshd = rand(a.heads), rand(a.kv_heads), rand(a.kv_heads)
        dout_bshd = rand(a.heads)
        for t in (q_bshd, k_bshd, v_bshd):
            t.requires_grad_(True)
        if docs == "packed":
            doc_ids, lengths = packed_documents(a.batch, seq_len, max(1, seq_len // a.doc_fraction))
            doc_ids = doc_ids.to(device)
        else:
            doc_ids, lengths = None, [[seq_len]] * a.batch
        fwd, bwd = make_impl(impl, q_bshd, k_bshd, v_bshd, dout_bshd, doc_ids, lengths, kernels)
        before = dict(KERNEL_STATS.calls)
        fwd_ms, bwd_ms = time_fwd_bwd(fwd, bwd, device, a.warmup, a.repeats)
        if impl in ("block", "local"):
            calls = {p: KERNEL_STATS.calls[p] - before[p] for p in PATHS}
            row["fallbacks"] = calls["fallback"]
            row["calls"] = {p: n for p, n in calls.items() if n}
            row["cudnn_calls"] = calls["cudnn"]
        res = fwd()
        result = [res[0] if isinstance(res, tuple) else res, *bwd(res)]
        if impl == "sdpa":
            sdpa_result.clear()
            sdpa_result[(seq_len, docs)] = [t.detach() for t in result]
        elif (seq_len, docs) in sdpa_result:
            row["max_err"] = float(f"{max_error(result, sdpa_result[(seq_len, docs)]):.3g}")
            if row["max_err"] > a.tol:
                row.update(ok=False, error=f"max_err {row['max_err']} over the tolerance {a.tol} against SDPA")
        del res, result
        total = fwd_ms + bwd_ms
        tflops = causal_flops(a.heads, a.head_dim, lengths) / total / 1e9  # FLOP per ms / 1e9 = TFLOP/s
        if impl == "sdpa":
            sdpa_ms[(seq_len, docs)] = total
        base = sdpa_ms.get((seq_len, docs))
        row.update(num_docs=sum(len(r) for r in lengths), ms=round(total, 3), fwd_ms=round(fwd_ms, 3),
                   bwd_ms=round(bwd_ms, 3), tflops=float(f"{tflops:.4g}"),
                   ratio_to_sdpa=None if base is None else round(base / total, 3))
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # OOM, or no SDPA kernel for --sdpa-backend
        error = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else str(exc).splitlines()[0][:200]
        row.update(ok=False, error=error, ms=None, fwd_ms=None, bwd_ms=None, tflops=None, ratio_to_sdpa=None)
        if impl == "sdpa":
            sdpa_result.clear()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads Hq")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hkv")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--docs", nargs="+", choices=["none", "packed"], default=["none", "packed"])
    p.add_argument("--doc-fraction", type=int, default=8, help="packed documents average S / this many tokens")
    p.add_argument("--impls", nargs="+", choices=["sdpa", "local", "block", "block_ref"],
                   default=["sdpa", "local", "block"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sdpa-backend", choices=sorted(BACKENDS), default="auto",
                   help="restrict torch SDPA (the baseline, and local_attention, which calls it) to one backend")
    p.add_argument("--block-backend", choices=["auto", "flash", "cudnn"], default="auto",
                   help="the attention kernels' backend (trainer.attention_backend) of local and block")
    p.add_argument("--tol", type=float, default=2e-2, help="largest error against SDPA a row may have")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    kernels = AttentionKernels(a.block_backend)
    device = torch.device(a.device)
    impls = sorted(a.impls, key=lambda name: name != "sdpa")  # the baseline first: the others' ratios need it
    sdpa_ms: dict = {}
    sdpa_result: dict = {}
    backend = contextlib.nullcontext() if a.sdpa_backend == "auto" else sdpa_kernel(BACKENDS[a.sdpa_backend])
    with backend:
        for seq_len in a.seqs:
            for docs in a.docs:
                for impl in impls:
                    row = run_row(impl, seq_len, docs, a, device, sdpa_ms, kernels, sdpa_result)
                    print(json.dumps(dict(row, sdpa_backend=a.sdpa_backend, block_backend=a.block_backend)),
                          flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # after the row's tensors are gone: each row starts clean


if __name__ == "__main__":
    main()
