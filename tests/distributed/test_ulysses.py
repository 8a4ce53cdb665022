"""Ulysses attention against single-process attention (gloo, world sizes 2 and 4).

Every rank builds the same full q/k/v/doc ids/upstream gradient from one seed, takes its contiguous
sequence slice, runs :class:`UlyssesAttention` and its backward; the parent gathers the slices and
compares them with :func:`local_attention` run on the whole sequence with autograd.

Tolerances: Ulysses only moves numbers between ranks, so outputs and gradients differ from the
reference only through the inner kernel's reduction order on a differently shaped head batch;
in fp64 that is ~1e-15 for O(1) values, so 1e-10 leaves ample room and still catches any misrouted
head or token (those give errors of order 1). In fp32 the same reordering is ~1e-7; checked at 1e-5.

Layout legend: q_bshd [batch, seq, heads, head_dim]; k_bshd/v_bshd [batch, seq, kv_heads, head_dim];
doc_bs [batch, seq]; *_local the contiguous slice [batch, seq/U, ...] of one rank.
"""
from __future__ import annotations

import functools
from typing import Optional

import pytest
import torch

from longtrain.kernels.attention import local_attention
from longtrain.parallel.parallelize import build_sp_attention
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.sharding import shard_sequence
from longtrain.parallel.ulysses import (ULYSSES_STATS, UlyssesAttention, UlyssesStats, _AllToAll, all_to_all_heads_to_seq,
                                        all_to_all_seq_to_heads, validate_ulysses)
from support.harness import run_ranks

FP64_TOL = 1e-10
FP32_TOL = 1e-5
B, S, D = 2, 64, 8
HEADS = {"mha": (4, 4), "gqa": (4, 2), "gqa_kv1": (4, 1), "gqa_kv3": (6, 3),  # (Hq, Hkv)
         "wide_mha": (8, 8), "wide_gqa": (8, 4)}
DOC_LENGTHS = ([5, 37, 2], [20, 2, 37])  # per row, the rest of the row is one more document
# (name, heads, packed documents, dtype); gqa_kv3 (U=2: Hkv neither divides nor is divided by U).
CASES = [(f"{h}-{'packed' if packed else 'one'}-fp64", h, packed, torch.float64)
         for h in ("mha", "gqa", "gqa_kv1", "gqa_kv3") for packed in (False, True)]
CASES.append(("gqa-packed-fp32", "gqa", True, torch.float32))
# Pipelined head chunks: (name, heads, packed, dtype, chunks asked, chunks used at U=2 and U=4).
# wide_gqa at U=4 has one KV head per rank, so its chunks fall back to 1; 4 asked at U=2 become 2.
CHUNKED = [("wide_mha-packed-fp64-c2", "wide_mha", True, torch.float64, 2, {2: 2, 4: 2}),
           ("wide_gqa-packed-fp64-c2", "wide_gqa", True, torch.float64, 2, {2: 2, 4: 1}),
           ("wide_gqa-one-fp32-c4", "wide_gqa", False, torch.float32, 4, {2: 2, 4: 1})]
WORLDS = (2, 4)


def _runs_on(world: int, heads: str) -> bool:
    return HEADS[heads][0] % world == 0


def _doc_ids(packed: bool) -> Optional[torch.Tensor]:
    """[B, S] ids of packed documents with boundaries inside shards; None for one document a row."""
    if not packed:
        return None
    rows = []
    for lengths in DOC_LENGTHS:
        lengths = lengths + [S - sum(lengths)]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


def _inputs(heads: str, packed: bool, dtype: torch.dtype, seed: int = 0):
    hq, hkv = HEADS[heads]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, hq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, S, hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, S, hkv, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, S, hq, D, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)] + [_doc_ids(packed)]



class _TiledKV(UlyssesAttention):
    """Deliberately wrong KV replication order (k0 k1 k0 k1 instead of k0 k0 k1 k1)."""

    @staticmethod
    def _replicate_kv(kv_bshd, rep):
        return kv_bshd.repeat(1, 1, rep, 1)


def _run_case(attn_cls, heads, packed, dtype, rank, world, chunks=1, chunks_used=1):
    q, k, v, dout, doc_bs = _inputs(heads, packed, dtype)
    sl = slice(rank * S // world, (rank + 1) * S // world)
    q_local, k_local, v_local = (t[:, sl].clone().requires_grad_() for t in (q, k, v))
    seen = {"calls": 0}

    def spy_inner(q_bShd, k_bShd, v_bShd, doc_ids=None, scale=None):
        full_docs = doc_ids is None if not packed else bool(torch.equal(doc_ids, _doc_ids(packed)))
        seen.update(shape=tuple(q_bShd.shape), full_docs=full_docs, calls=seen["calls"] + 1)
        return local_attention(q_bShd, k_bShd, v_bShd, doc_ids=doc_ids, scale=scale)

    hq, hkv = HEADS[heads]
    attn = attn_cls(None, inner=spy_inner, num_heads=hq, num_kv_heads=hkv, chunks=chunks)
    out_local = attn(q_local, k_local, v_local, doc_ids=None if doc_bs is None else doc_bs[:, sl])
    out_local.backward(dout[:, sl])
    want = {"shape": (B, S, hq // world // chunks_used, D), "full_docs": True, "calls": chunks_used}
    assert seen == want, (seen, want)
    return [t.detach().numpy() for t in (out_local, q_local.grad, k_local.grad, v_local.grad)]


def _run_hybrid(rank):
    """Ulysses 2 x ring 2 on 4 ranks: ring attention as the inner function, on Ulysses subgroups."""
    dims = ParallelDims(world_size=4, ulysses=2, ring=2)
    dims.build_groups()
    attn = build_sp_attention(dims)
    assert isinstance(attn, UlyssesAttention) and attn.degree == 2
    part = functools.partial(shard_sequence, ring_size=2, ring_rank=dims.rank("ring"), ulysses_size=2,
                             ulysses_rank=dims.rank("ulysses"))
    q, k, v, dout, doc_bs = _inputs("gqa_kv1", True, torch.float64)
    q_local, k_local, v_local = (part(t).clone().requires_grad_() for t in (q, k, v))
    out_local = attn(q_local, k_local, v_local, doc_ids=part(doc_bs))
    out_local.backward(part(dout))
    idx = part(torch.arange(S)[None])[0]
    return [idx.numpy()] + [t.detach().numpy() for t in (out_local, q_local.grad, k_local.grad, v_local.grad)]


def _worker(rank, world):
    out = {}
    for name, heads, packed, dtype in CASES:
        if _runs_on(world, heads):
            out[(name, rank)] = _run_case(UlyssesAttention, heads, packed, dtype, rank, world)
    for name, heads, packed, dtype, chunks, used in CHUNKED:
        out[(name, rank)] = _run_case(UlyssesAttention, heads, packed, dtype, rank, world, chunks, used[world])
    wrong = "gqa" if world == 4 else "gqa_kv3"  # both replicate KV heads with more than one KV head
    out[("wrong-order", rank)] = _run_case(_TiledKV, wrong, True, torch.float64, rank, world)

    # Round trip, routing and byte counts of the bare all-to-alls.
    gen = torch.Generator().manual_seed(1)
    x_full = torch.randn(B, S, 8, D, generator=gen, dtype=torch.float64)
    s, h = S // world, 8 // world
    x_local = x_full[:, rank * s:(rank + 1) * s].clone().requires_grad_()
    stats = UlyssesStats()
    x_bShd = all_to_all_seq_to_heads(x_local, None, stats)
    back = all_to_all_heads_to_seq(x_bShd, None, stats)
    weight = torch.randn(back.shape, generator=gen, dtype=torch.float64)
    (back * weight).sum().backward()
    # Two different dtypes take the per-tensor asynchronous path; check it routes like the packed one.
    y32, y64 = _AllToAll.apply(None, 2, 1, None, x_local.detach().float(), x_local.detach())
    out[("a2a", rank)] = dict(
        routed=bool(torch.equal(x_bShd, x_full[:, :, rank * h:(rank + 1) * h])),
        round_trip=bool(torch.equal(back, x_local)), grad_is_weight=bool(torch.equal(x_local.grad, weight)),
        async_path=bool(torch.equal(y64, x_bShd) and torch.equal(y32, x_bShd.float())), stats=stats.as_dict())

    # Attention traffic: one packed q/k/v all-to-all and one output all-to-all each way, one gather.
    q, k, v, dout, doc_bs = _inputs("gqa", True, torch.float64)
    sl = slice(rank * s, (rank + 1) * s)
    attn = UlyssesAttention(None, num_heads=4, num_kv_heads=2, stats=UlyssesStats())
    doc_local = doc_bs[:, sl].clone()
    for _ in range(2):  # the second layer reuses the gathered doc ids (no all-gather)
        attn(*(t[:, sl].clone().requires_grad_() for t in (q, k, v)), doc_ids=doc_local).backward(dout[:, sl])
    after_two = attn.stats.as_dict()
    doc_local.add_(0)  # an in-place change must invalidate the cache
    attn(q[:, sl], k[:, sl], v[:, sl], doc_ids=doc_local)
    cached_while_alive = attn._doc_cache is not None
    del doc_local  # the batch is gone: its gathered ids go with it (not held until the next step)
    dropped_with_batch = attn._doc_cache is None
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        doc_inf = doc_bs[:, sl].clone()
        for _ in range(2):
            attn(q[:, sl], k[:, sl], v[:, sl], doc_ids=doc_inf)
    try:
        UlyssesAttention(None, num_heads=6, num_kv_heads=6)
        error = ""
    except ValueError as exc:
        error = str(exc)
    out[("traffic", rank)] = dict(after_two=after_two, gathers=attn.stats.num_all_gather, error=error,
                                  dropped=cached_while_alive and dropped_with_batch)
    if world == 4:
        out[("hybrid", rank)] = _run_hybrid(rank)
    return out


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"U{w}")
def world_results(request):
    world = request.param
    return world, {key: value for out in run_ranks(_worker, world) for key, value in out.items()}


def _reference(heads, packed, dtype):
    q, k, v, dout, doc_bs = _inputs(heads, packed, dtype)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = local_attention(q, k, v, doc_ids=doc_bs)
    out.backward(dout)
    return [t.detach() for t in (out, q.grad, k.grad, v.grad)]


def _gathered(results, key, world):
    return [torch.cat([torch.from_numpy(results[(key, r)][i]) for r in range(world)], dim=1) for i in range(4)]


@pytest.mark.parametrize("name, heads, packed, dtype", CASES, ids=[c[0] for c in CASES])
def test_matches_single_process(world_results, name, heads, packed, dtype):
    world, results = world_results
    if not _runs_on(world, heads):
        pytest.skip(f"Hq={HEADS[heads][0]} does not split over U={world}")
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    for what, got, want in zip(("out", "dq", "dk", "dv"), _gathered(results, name, world),
                               _reference(heads, packed, dtype)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name, heads, packed, dtype", [c[:4] for c in CHUNKED], ids=[c[0] for c in CHUNKED])
def test_pipelined_chunks_match_single_process(world_results, name, heads, packed, dtype):
    world, results = world_results
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    for what, got, want in zip(("out", "dq", "dk", "dv"), _gathered(results, name, world),
                               _reference(heads, packed, dtype)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def test_wrong_kv_order_is_caught(world_results):
    world, results = world_results
    got = _gathered(results, "wrong-order", world)[0]
    want = _reference("gqa" if world == 4 else "gqa_kv3", True, torch.float64)[0]
    assert (got - want).abs().max() > 1e-2  # the comparison above would fail for this layout


def test_all_to_all_round_trip_and_bytes(world_results):
    world, results = world_results
    n_bytes = B * (S // world) * 8 * D * 8  # local [B, S/U, 8, D] fp64 tensor
    for rank in range(world):
        r = results[("a2a", rank)]
        assert r["routed"] and r["round_trip"] and r["grad_is_weight"] and r["async_path"]
        # seq->heads and heads->seq forward, then both backwards: 4 calls of (U-1)/U of the tensor.
        assert r["stats"]["num_all_to_all"] == 4
        assert r["stats"]["fwd_bytes_sent"] == r["stats"]["bwd_bytes_sent"] == 2 * n_bytes * (world - 1) // world
        assert r["stats"]["bytes_sent"] == 4 * n_bytes * (world - 1) // world


def test_attention_traffic_and_doc_id_cache(world_results):
    world, results = world_results
    s, rep = S // world, validate_ulysses(4, 2, world)
    qkv_elems = B * s * D * (4 + 2 * 2 * rep)  # q, then k and v with their replicas
    out_elems = B * s * 4 * D
    a2a_per_layer = (qkv_elems + out_elems) * 8 * (world - 1) // world  # each way, fp64
    gather = B * s * 8 * (world - 1)  # int64 ids to U-1 peers
    for rank in range(world):
        r = results[("traffic", rank)]
        assert r["after_two"]["num_all_to_all"] == 2 * 4
        assert r["after_two"]["num_all_gather"] == 1  # the second layer hit the cache
        assert r["after_two"]["fwd_bytes_sent"] == 2 * a2a_per_layer + gather
        assert r["after_two"]["bwd_bytes_sent"] == 2 * a2a_per_layer
        assert r["gathers"] == 4  # in-place change: gathered again; inference mode: every call
        assert r["dropped"]
        if world == 4:
            assert "parallel.sp.ulysses=4 does not divide model.num_heads=6" in r["error"]
        else:
            assert r["error"] == ""


def test_hybrid_with_ring_inner(world_results):
    world, results = world_results
    if world != 4:
        pytest.skip("the ulysses 2 x ring 2 layout needs 4 ranks")
    want = _reference("gqa_kv1", True, torch.float64)
    got = [torch.zeros_like(w) for w in want]
    for rank in range(world):
        idx, *parts = results[("hybrid", rank)]
        for g, p in zip(got, parts):
            g[:, torch.from_numpy(idx)] = torch.from_numpy(p)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=FP64_TOL, atol=FP64_TOL, msg=lambda m: f"{what}: {m}")


def test_validate_ulysses():
    assert validate_ulysses(4, 4, 2) == 1 and validate_ulysses(4, 2, 2) == 1
    assert validate_ulysses(4, 2, 4) == 2 and validate_ulysses(4, 1, 4) == 4 and validate_ulysses(4, 1, 2) == 2
    assert validate_ulysses(6, 3, 2) == 2 and validate_ulysses(32, 8, 16) == 2 and validate_ulysses(12, 6, 4) == 2
    with pytest.raises(ValueError, match=r"parallel.sp.ulysses=4 does not divide model.num_heads=6; choose a "
                                         r"ulysses degree in \[1, 2, 3, 6\] or use parallel.sp.ring .*hybrid"):
        validate_ulysses(6, 6, 4)
    with pytest.raises(ValueError, match="parallel.sp.ulysses must be at least 1"):
        validate_ulysses(4, 4, 0)
    with pytest.raises(ValueError, match="model.num_heads=6 must be a positive multiple of model.num_kv_heads=4"):
        validate_ulysses(6, 4, 2)


def test_single_process_is_the_inner_function():
    q, k, v, _, doc_bs = _inputs("gqa", True, torch.float64)
    attn = UlyssesAttention()
    assert attn.degree == 1
    torch.testing.assert_close(attn(q, k, v, doc_ids=doc_bs), local_attention(q, k, v, doc_ids=doc_bs),
                               rtol=0, atol=0)
    assert attn.stats is ULYSSES_STATS
