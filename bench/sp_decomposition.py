"""The compute cost of splitting attention for sequence parallelism, measured on one device.

P ranks are simulated one after another on one device, doing exactly the attention work each rank
of a real run does, without the network:

- ``ring``: the sequence is zigzag-sharded (2P chunks, rank r holds chunks r and 2P-1-r). Each
  simulated rank runs the block forward of :class:`longtrain.kernels.dispatch.AttentionKernels`
  (``--backend``, as ``trainer.attention_backend``) on every key block it can see and merges them with ``merge_partials`` (fp32), then the block
  backward of each of those blocks from the merged output and lse, adding dQ to its fp32
  accumulator and dK/dV to the block owner's fp32 accumulators: what ``ring_attention`` computes.
  The unsplit baseline is the same kernels on the whole sequence as one block.
- ``ulysses``: the heads are split into P groups (Hq/P query heads; KV heads split, or replicated
  when P > Hkv) and each group runs :class:`~longtrain.kernels.attention.LocalAttention` forward +
  backward on the full sequence, on the same kernels. The unsplit baseline is local attention on all
  heads.

Each row: {"layout", "P", "S", "docs", "unsplit_ms", "split_ms" (sum over the simulated ranks),
"max_rank_ms", "ratio" = unsplit_ms / split_ms (1.0: splitting costs nothing; the target is >= 0.9),
"balance" = split_ms / (P x max_rank_ms) (1.0: every rank does the same work), "max_err" (largest
``max |x - y| / (max |y| + 1)`` of output, dQ, dK, dV against the unsplit computation), "ok"}. The
split is exact up to rounding, so a row whose ``max_err`` passes ``--tol`` (default 2e-2, bf16's
three significant digits) has ok=false and says so; a row whose unsplit baseline ran out of memory
has no error to check and says that instead. Timing: CUDA events (perf_counter on CPU), ``--warmup`` untimed runs, median of ``--repeats``.

Usage (one GPU, bf16):
  python bench/sp_decomposition.py --ranks 2 4 8 --seqs 32768 131072
CPU smoke test (tiny):
  python bench/sp_decomposition.py --device cpu --ranks 2 4 --seqs 256 --heads 4 --kv-heads 2 --head-dim 16 \
      --dtype fp32 --warmup 0 --repeats 1 --docs none packed
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import List

import torch

from longtrain.kernels.attention import LocalAttention
from longtrain.kernels.blocks import has_visible_keys, merge_partials
from longtrain.kernels.dispatch import AttentionKernels
from longtrain.parallel.sharding import zigzag_indices, zigzag_shard, zigzag_unshard

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Clock:
    """Marks in time (CUDA events, or perf_counter on CPU); :meth:`intervals_ms` between marks."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> List[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks[:-1], self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks[:-1], self.marks[1:])]


def ring_split(q, k, v, dout, doc_ids, num_ranks: int, kernels: AttentionKernels):
    """Per simulated rank: a closure doing its ring forward + backward; and the gathered results."""
    forward, backward = kernels.forward, kernels.backward
    scale, seq_len, acc = 1.0 / math.sqrt(q.shape[-1]), q.shape[1], torch.float32
    idx = [zigzag_indices(seq_len, num_ranks, r).to(q.device) for r in range(num_ranks)]
    qs, ks, vs, douts = ([zigzag_shard(t, num_ranks, r) for r in range(num_ranks)] for t in (q, k, v, dout))
    docs = [None if doc_ids is None else zigzag_shard(doc_ids, num_ranks, r) for r in range(num_ranks)]
    res = {}

    def rank_work(r: int) -> None:
        out, lse, seen = None, None, []
        for step in range(num_ranks):  # the order in which K/V blocks visit rank r
            s = (r - step) % num_ranks
            if has_visible_keys(idx[r], idx[s], docs[r], docs[s]):
                out_i, lse_i = forward(qs[r], ks[s], vs[s], idx[r], idx[s], docs[r], docs[s], scale)
                out, lse = (out_i.to(acc), lse_i) if out is None else merge_partials(out, lse, out_i, lse_i)
                seen.append(s)
        out = out.to(q.dtype)
        dq = torch.zeros(qs[r].shape, dtype=acc, device=q.device)
        for s in seen:
            dq_i, dk_i, dv_i = backward(douts[r], qs[r], ks[s], vs[s], out, lse, idx[r], idx[s], docs[r], docs[s],
                                        scale)
            dq += dq_i
            res["dk"][s] += dk_i
            res["dv"][s] += dv_i
        res["out"][r], res["dq"][r] = out, dq

    def reset() -> None:  # the travelling dK/dV accumulators start at zero for every block
        res.update(out=[None] * num_ranks, dq=[None] * num_ranks,
                   dk=[torch.zeros(t.shape, dtype=acc, device=q.device) for t in ks],
                   dv=[torch.zeros(t.shape, dtype=acc, device=q.device) for t in vs])

    def gathered():
        return [zigzag_unshard(res[name], num_ranks) for name in ("out", "dq", "dk", "dv")]

    def unsplit():
        full = torch.arange(seq_len, device=q.device)
        out, lse = forward(q, k, v, full, full, doc_ids, doc_ids, scale)
        return [out, *backward(dout, q, k, v, out, lse, full, full, doc_ids, doc_ids, scale)]
    return reset, [lambda r=r: rank_work(r) for r in range(num_ranks)], gathered, unsplit


def ulysses_split(q, k, v, dout, doc_ids, num_ranks: int, kernels: AttentionKernels):
    """As :func:`ring_split`, for a split of the heads into ``num_ranks`` groups over the full sequence."""
    local_attention = LocalAttention(kernels)
    num_heads, num_kv = q.shape[2], k.shape[2]
    if num_heads % num_ranks or (num_kv % num_ranks and num_ranks % num_kv):
        raise ValueError(f"Hq={num_heads}, Hkv={num_kv} do not split over P={num_ranks}")
    hq, hkv = num_heads // num_ranks, max(1, num_kv // num_ranks)
    kv_of = [g * num_kv // num_ranks for g in range(num_ranks)]  # first KV head of group g (replicated if P > Hkv)
    groups = [[t[:, :, h:h + n].detach().contiguous().requires_grad_(t.requires_grad) for t, h, n in
               ((q, g * hq, hq), (k, kv_of[g], hkv), (v, kv_of[g], hkv), (dout, g * hq, hq))]
              for g in range(num_ranks)]
    res: List[list] = [None] * num_ranks

    def rank_work(g: int) -> None:
        qg, kg, vg, doutg = groups[g]
        out = local_attention(qg, kg, vg, doc_ids)
        res[g] = [out.detach(), *torch.autograd.grad(out, (qg, kg, vg), doutg)]

    def gathered():
        out, dq = (torch.cat([r[i] for r in res], dim=2) for i in (0, 1))
        dk, dv = (torch.stack([r[i] for r in res]).reshape(min(num_kv, num_ranks), -1, *res[0][i].shape).sum(1)
                  .permute(1, 2, 0, 3, 4).flatten(2, 3) for i in (2, 3))  # sum the replicas of a KV head
        return [out, dq, dk, dv]

    def unsplit():
        out = local_attention(q, k, v, doc_ids)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]
    return (lambda: None), [lambda g=g: rank_work(g) for g in range(num_ranks)], gathered, unsplit


def run_row(layout: str, num_ranks: int, seq_len: int, docs: str, a, device: torch.device,
            kernels: AttentionKernels) -> dict:
    row = dict(layout=layout, P=num_ranks, S=seq_len, docs=docs, B=a.batch, Hq=a.heads, Hkv=a.kv_heads,
               D=a.head_dim, dtype=a.dtype, device=str(device), ok=True)
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(a.batch, seq_len, h, a.head_dim, generator=gen).to(device, DTYPES[a.dtype])
                         for h in (a.heads, a.kv_heads, a.kv_heads, a.heads))
        for t in (q, k, v):
            t.requires_grad_(layout == "ulysses")
        doc_ids = None
        if docs == "packed":  # documents of random lengths averaging S/8, boundaries anywhere
            lengths = torch.randint(1, seq_len // 4, (seq_len,), generator=gen).cumsum(0)
            doc_ids = torch.bucketize(torch.arange(seq_len), lengths[lengths < seq_len], right=True)
            doc_ids = doc_ids.expand(a.batch, -1).contiguous().to(device)
        split = ring_split if layout == "ring" else ulysses_split
        reset, ranks, gathered, unsplit = split(q, k, v, dout, doc_ids, num_ranks, kernels)
        unsplit_ms, expect = [], None
        try:
            for it in range(a.warmup + a.repeats):
                clock = Clock(device)
                clock.mark()
                expect = unsplit()
                clock.mark()
                unsplit_ms += clock.intervals_ms() if it >= a.warmup else []
        except torch.OutOfMemoryError:  # the whole sequence as one block can need more memory than its split
            unsplit_ms, expect = [], None
            row.update(unsplit_error="out of memory")
        split_ms, max_rank_ms = [], []
        for it in range(a.warmup + a.repeats):
            clock = Clock(device)
            clock.mark()
            reset()
            for work in ranks:
                work()
                clock.mark()
            times = clock.intervals_ms()
            if it >= a.warmup:
                split_ms.append(sum(times))
                max_rank_ms.append(max(times))
        split_t, worst = statistics.median(split_ms), statistics.median(max_rank_ms)
        base = statistics.median(unsplit_ms) if unsplit_ms else None
        err = None if expect is None else max(((got.float() - want.float()).abs().max()
                                               / (want.float().abs().max() + 1.0)).item()
                                              for got, want in zip(gathered(), expect))
        row.update(unsplit_ms=None if base is None else round(base, 3), split_ms=round(split_t, 3),
                   max_rank_ms=round(worst, 3), ratio=None if base is None else round(base / split_t, 3),
                   balance=round(split_t / (num_ranks * worst), 3),
                   max_err=None if err is None else float(f"{err:.3g}"))
        if err is not None and err > a.tol:
            row.update(ok=False, error=f"max_err {row['max_err']} over the tolerance {a.tol} against the unsplit run")
    except torch.OutOfMemoryError:
        row.update(ok=False, error="out of memory")
    except ValueError as exc:
        row.update(ok=False, error=str(exc))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="simulated ranks P")
    p.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--layouts", nargs="+", choices=["ring", "ulysses"], default=["ring", "ulysses"])
    p.add_argument("--docs", nargs="+", choices=["none", "packed"], default=["none"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads Hq")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hkv")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", choices=["auto", "flash", "cudnn"], default="auto",
                   help="the attention kernels' backend (trainer.attention_backend)")
    p.add_argument("--tol", type=float, default=2e-2, help="largest error against the unsplit run a row may have")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    kernels = AttentionKernels(a.backend)
    for seq_len in a.seqs:
        for docs in a.docs:
            for layout in a.layouts:
                for num_ranks in a.ranks:
                    print(json.dumps(run_row(layout, num_ranks, seq_len, docs, a, device, kernels)), flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # after the row's tensors are gone: each row starts clean


if __name__ == "__main__":
    main()
