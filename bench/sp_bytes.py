"""Bytes sent per rank by sequence-parallel attention: measured on gloo against the closed formulas.

For each layout (Ulysses U x ring R) it runs one attention layer's forward and backward through
:func:`longtrain.parallel.parallelize.build_sp_attention` on random inputs sharded as the trainer shards
them, reads rank 0's byte counters (the Ulysses wrapper's ``stats`` and ``RING_STATS``, reset
before each pass) and prints one JSON line per layout: measured bytes, the formula's, their ratio
(1.0: the counters match the formula byte for byte) and ``parts`` ([measured, predicted] for each
of ulysses/ring x fwd/bwd). Every rank of a layout sends the same amount (zigzag shards, equal
all-to-all rows), so rank 0 stands for all. One set of CPU processes (torch.multiprocessing spawn,
gloo on 127.0.0.1) runs every layout in turn: the world is the largest U*R (4 by default) and
data parallelism fills the rest (dp = world / (U R); dp replicas are independent, so a rank's SP
traffic does not depend on dp).

Formulas: bytes sent by one rank for one attention layer. B batch, S tokens per sequence, Hq/Hkv
query/KV heads, D head dim, b bytes per element of q/k/v (4 fp32, 2 bf16), a = 4 bytes per
element of the ring's dK/dV accumulators (fp32; 8 for fp64 inputs), e = 8 bytes per document id
(int64), docs = 1 with packed documents else 0, U Ulysses degree, R ring degree.
    S_r   = S / (U R)                 tokens a rank holds
    h     = Hq D                      query width
    hkv'  = lcm(Hkv, U) D             KV width after replication for Ulysses: each KV head is
                                      repeated U / gcd(Hkv, U) times (= max(Hkv, U) D when one of
                                      Hkv, U divides the other; = Hkv D when U divides Hkv)
    hkv_r = hkv' / U                  KV width a ring rank holds after the Ulysses all-to-all
Ulysses (zero when U = 1): an all-to-all sends (U-1)/U of its local tensor (one of U rows stays).
    forward  = (U-1)/U B S_r (2h + 2hkv') b    q, k, v to heads; the output back to sequence
               + docs (U-1) B S_r e            all-gather of the document ids (cached: later layers of
                                               the same step send none)
    backward = (U-1)/U B S_r (2h + 2hkv') b    dout to heads; dq, dk, dv back to sequence
Ring (zero when R = 1): runs on each ring rank's Ulysses-level sequence of S/R tokens.
    forward  = (R-1) [2 B (S/R) hkv_r b + 8 (S/R) + docs B (S/R) e]
               R-1 hops of the visiting K and V, its int64 global token indices (one [S/R]
               vector, not per batch row) and its document ids
    backward = (R-1) 2 B (S/R) hkv_r b + R 2 B (S/R) hkv_r a
               K and V again (indices and document ids were kept from the forward), and the
               dK/dV accumulators, which make R hops so each ends on its owner
Examples (per layer, per rank): Ulysses only: (U-1)/U (S/U) (2h + 2hkv') b each way, which stays
constant when S and U grow together; ring only without documents: forward (R-1)(S/R)(2 Hkv D b + 8).

Usage (CPU, gloo; the numbers recorded in docs/BENCHMARKS.md):
  python bench/sp_bytes.py
  python bench/sp_bytes.py --dtype bf16 --docs        # bf16 and packed documents
  python bench/sp_bytes.py --layouts 4x1 --kv-heads 2  # KV heads replicated (Hkv < U)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longtrain.parallel.parallelize import build_sp_attention
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.ring import RING_STATS
from longtrain.parallel.sharding import shard_sequence

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
DOC_BYTES = 8  # int64 document ids
IDX_BYTES = 8  # int64 token indices


def predict(a, ulysses: int, ring: int) -> dict:
    """Bytes one rank sends for one layer (see the module docstring), by component and pass."""
    b = torch.empty(0, dtype=DTYPES[a.dtype]).element_size()
    acc = 8 if a.dtype == "fp64" else 4
    docs = int(a.docs)
    s_r = a.seq // (ulysses * ring)
    h, hkv_u = a.heads * a.head_dim, math.lcm(a.kv_heads, ulysses) * a.head_dim
    hkv_r, s_ring = hkv_u // ulysses, a.seq // ring
    a2a = (ulysses - 1) * a.batch * s_r * (2 * h + 2 * hkv_u) * b // ulysses
    return {"ulysses_fwd": a2a + docs * (ulysses - 1) * a.batch * s_r * DOC_BYTES, "ulysses_bwd": a2a,
            "ring_fwd": (ring - 1) * (2 * a.batch * s_ring * hkv_r * b + IDX_BYTES * s_ring
                                      + docs * a.batch * s_ring * DOC_BYTES),
            "ring_bwd": (0 if ring == 1 else
                         (ring - 1) * 2 * a.batch * s_ring * hkv_r * b + ring * 2 * a.batch * s_ring * hkv_r * acc)}


def _counters(attn) -> tuple:
    stats = getattr(attn, "stats", None)
    return (0 if stats is None else stats.bytes_sent), RING_STATS.fwd_bytes_sent + RING_STATS.bwd_bytes_sent


def _reset(attn) -> None:
    if getattr(attn, "stats", None) is not None:
        attn.stats.reset()
    RING_STATS.reset()


def _run_layout(world: int, ulysses: int, ring: int, a) -> dict:
    """One layer's forward and backward on this rank; its byte counters for each pass."""
    dims = ParallelDims(world_size=world, ulysses=ulysses, ring=ring)  # dp = world / (U R) fills the rest
    dims.validate_seq_len(a.seq)
    dims.build_groups()
    attn = build_sp_attention(dims)
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank, then this rank's shard
    full = [torch.randn(a.batch, a.seq, n, a.head_dim, generator=gen, dtype=DTYPES[a.dtype])
            for n in (a.heads, a.kv_heads, a.kv_heads, a.heads)]

    def shard(x):
        return shard_sequence(x, ring, dims.rank("ring"), ulysses, dims.rank("ulysses")).contiguous()
    q_bshd, k_bshd, v_bshd, dout_bshd = (shard(t) for t in full)
    for t in (q_bshd, k_bshd, v_bshd):
        t.requires_grad_(True)
    doc_ids = None
    if a.docs:  # documents of random lengths averaging S/8, boundaries anywhere (inside shards too)
        ends = torch.randint(1, a.seq // 4, (a.seq,), generator=gen).cumsum(0)
        doc_ids = shard(torch.bucketize(torch.arange(a.seq), ends[ends < a.seq], right=True).expand(a.batch, -1))
    dist.barrier()
    _reset(attn)
    out_bshd = attn(q_bshd, k_bshd, v_bshd, doc_ids)
    (ulysses_fwd, ring_fwd), _ = _counters(attn), _reset(attn)
    out_bshd.backward(dout_bshd)
    ulysses_bwd, ring_bwd = _counters(attn)
    dist.barrier()
    return dict(ulysses_fwd=ulysses_fwd, ring_fwd=ring_fwd, ulysses_bwd=ulysses_bwd, ring_bwd=ring_bwd)


def _worker(rank: int, world: int, port: int, layouts: list, a, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    results = [_run_layout(world, ulysses, ring, a) for ulysses, ring in layouts]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(a, layouts: list) -> list:
    """Rows for every (U, R) layout: rank 0's measured bytes, the formula's and their ratios.

    One set of processes runs every layout in turn: the world is the largest U*R and the data-
    parallel degree fills the rest (dp replicas are independent copies, so a rank's SP traffic
    does not depend on dp).
    """
    world = max(u * r for u, r in layouts)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.json")
        mp.spawn(_worker, args=(world, _free_port(), layouts, a, path), nprocs=world, join=True)
        with open(path) as f:
            measured = json.load(f)
    rows = []
    for (ulysses, ring), got in zip(layouts, measured):
        want = predict(a, ulysses, ring)
        name = "x".join(f"{kind}{n}" for kind, n in (("ulysses", ulysses), ("ring", ring)) if n > 1) or "local"
        row = dict(layout=name, U=ulysses, R=ring, world=world, dp=world // (ulysses * ring), B=a.batch, S=a.seq,
                   Hq=a.heads, Hkv=a.kv_heads, D=a.head_dim, dtype=a.dtype, docs=a.docs)
        for phase in ("fwd", "bwd"):
            got_bytes = got[f"ulysses_{phase}"] + got[f"ring_{phase}"]
            want_bytes = want[f"ulysses_{phase}"] + want[f"ring_{phase}"]
            row[f"{phase}_bytes"], row[f"{phase}_pred"] = got_bytes, want_bytes
            row[f"{phase}_ratio"] = round(got_bytes / want_bytes, 6) if want_bytes else None
            row[f"{phase}_mib"] = round(got_bytes / 2**20, 3)
        row["parts"] = {k: [got[k], want[k]] for k in want}  # [measured, predicted] per component
        row["match"] = all(got[k] == want[k] for k in want)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=["2x1", "4x1", "1x2", "1x4", "2x2"],
                   help="UxR: Ulysses degree x ring degree (world size U*R)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096, help="tokens per (unsharded) sequence S")
    p.add_argument("--heads", type=int, default=32, help="query heads Hq")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hkv")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--docs", action="store_true", help="packed documents (document ids travel too)")
    a = p.parse_args()
    layouts = []
    for layout in a.layouts:
        try:
            ulysses, ring = (int(x) for x in layout.lower().split("x"))
        except ValueError:
            p.error(f"--layouts: {layout!r} is not UxR, e.g. 2x2")
        layouts.append((ulysses, ring))
    for row in measure(a, layouts):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
