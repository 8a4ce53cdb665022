"""Ring attention against single-process attention: block kernels, zigzag sharding, gloo rings.

Tolerances: in fp64 the ring and the reference compute the same sums in a different order, so they
agree to ~1e-14 for O(1) values; 1e-10 leaves room for that and still catches any masking or merge
bug (those give errors of 1e-2 and more). In fp32 the same reordering gives ~1e-6, checked at 1e-5.

Layout legend: q_bshd [batch, seq, heads, head_dim]; k_bshd/v_bshd [batch, seq, kv_heads, head_dim];
doc_bs [batch, seq]; idx [seq] global token indices; lse_bhs [batch, heads, seq].
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import longtrain.parallel.ring as ring_mod
from longtrain.kernels.attention import local_attention
from longtrain.kernels.blocks import has_visible_keys, merge_partials, reference_block_backward, reference_block_forward
from longtrain.parallel.ring import RingAttention, RingStats, ring_attention, zigzag_ring_attention
from longtrain.parallel.sharding import zigzag_indices, zigzag_shard, zigzag_unshard
from support.harness import run_ranks

FP64_TOL = 1e-10
FP32_TOL = 1e-5
B, S, HQ, D = 2, 64, 4, 8


def _packed_doc_ids(batch: int, seq_len: int) -> torch.Tensor:
    """Documents whose boundaries fall inside zigzag chunks (and so inside ring blocks)."""
    rows = []
    for lengths in ([5, 37, 2], [17, 1, 30])[:batch]:
        lengths = lengths + [seq_len - sum(lengths)]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


def _inputs(hkv: int, dtype: torch.dtype, seq_len: int = S, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, seq_len, HQ, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, seq_len, hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, seq_len, hkv, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, seq_len, HQ, D, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _dense_attention(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale):
    """Masked softmax attention written out densely; differentiable, zero for rows that see nothing."""
    group = q_bshd.shape[2] // k_bshd.shape[2]
    k_bshd, v_bshd = (t.repeat_interleave(group, dim=2) for t in (k_bshd, v_bshd))
    mask = (k_idx[None, :] <= q_idx[:, None])[None]
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    scores = torch.einsum("bqhd,bkhd->bhqk", q_bshd, k_bshd) * scale
    scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * mask[:, None].any(-1, keepdim=True)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v_bshd)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- zigzag sharding


@pytest.mark.parametrize("ring_size", [1, 2, 4])
def test_zigzag_indices_cover_and_balance(ring_size):
    seq_len, chunk = 64, 64 // (2 * ring_size)
    held = [zigzag_indices(seq_len, ring_size, r) for r in range(ring_size)]
    for r, idx in enumerate(held):
        late = 2 * ring_size - 1 - r
        assert torch.equal(idx, torch.cat([torch.arange(r * chunk, (r + 1) * chunk),
                                           torch.arange(late * chunk, (late + 1) * chunk)]))
    assert torch.equal(torch.sort(torch.cat(held)).values, torch.arange(seq_len))
    # Causal work of a rank = number of (query, key) pairs with key <= query = sum(idx + 1).
    work = {int((idx + 1).sum()) for idx in held}
    assert len(work) == 1
    x = torch.arange(3 * seq_len).reshape(3, seq_len)
    parts = [zigzag_shard(x, ring_size, r) for r in range(ring_size)]
    assert all(torch.equal(p, x[:, i]) for p, i in zip(parts, held))
    assert torch.equal(zigzag_unshard(parts, ring_size), x)


def test_zigzag_bad_seq_len():
    with pytest.raises(ValueError, match=r"data\.seq_len=60.*2 \* parallel\.sp\.ring = 8"):
        zigzag_indices(60, 4, 0)
    with pytest.raises(ValueError, match="data.seq_len"):
        zigzag_shard(torch.zeros(1, 12), 4, 1)
    q = torch.zeros(1, 32, 2, 4)
    with pytest.raises(ValueError, match="data.seq_len / parallel.sp.ring"):
        zigzag_ring_attention(q, q, q, group=None, seq_len=64)


# ---------------------------------------------------------------- block kernels


def _blocks(seq_len: int, num_blocks: int):
    return [zigzag_indices(seq_len, num_blocks, r) for r in range(num_blocks)]


@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("docs", [False, True])
def test_block_forward_merge_equals_full(hkv, docs):
    q, k, v, _ = _inputs(hkv, torch.float64, seq_len=48)
    doc = _packed_doc_ids(B, 48) if docs else None
    scale = 1 / math.sqrt(D)
    q_idx = zigzag_indices(48, 3, 1)
    q_doc = None if doc is None else doc[:, q_idx]
    out, lse = None, None
    for k_idx in _blocks(48, 3):
        k_doc = None if doc is None else doc[:, k_idx]
        out_i, lse_i = reference_block_forward(q[:, q_idx], k[:, k_idx], v[:, k_idx], q_idx, k_idx, q_doc, k_doc, scale)
        out, lse = (out_i, lse_i) if out is None else merge_partials(out, lse, out_i, lse_i)
    all_idx = torch.arange(48)
    full_out, full_lse = reference_block_forward(q[:, q_idx], k, v, q_idx, all_idx, q_doc, doc, scale)
    tiled_out, tiled_lse = reference_block_forward(q[:, q_idx], k, v, q_idx, all_idx, q_doc, doc, scale, q_tile=5)
    dense = _dense_attention(q[:, q_idx], k, v, q_idx, all_idx, q_doc, doc, scale)
    for got in (out, full_out, tiled_out):
        assert _err(got, dense) < FP64_TOL
    assert _err(lse, full_lse) < FP64_TOL and _err(tiled_lse, full_lse) < FP64_TOL
    assert lse.dtype == torch.float64


@pytest.mark.parametrize("hkv", [4, 1])
def test_dropping_a_block_is_caught(hkv):
    """The comparison above can fail: a merge that loses one key block is far off."""
    q, k, v, _ = _inputs(hkv, torch.float64, seq_len=48)
    q_idx, scale = zigzag_indices(48, 3, 2), 1 / math.sqrt(D)
    partials = [reference_block_forward(q[:, q_idx], k[:, i], v[:, i], q_idx, i, None, None, scale)
                for i in _blocks(48, 3)]
    dropped = merge_partials(*partials[0], *partials[2])[0]
    full = merge_partials(*merge_partials(*partials[0], *partials[1]), *partials[2])[0]
    dense = _dense_attention(q[:, q_idx], k, v, q_idx, torch.arange(48), None, None, scale)
    assert _err(full, dense) < FP64_TOL
    assert _err(dropped, dense) > 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
@pytest.mark.parametrize("hkv", [4, 1])
def test_block_backward_equals_autograd(hkv, dtype, tol):
    q, k, v, dout = _inputs(hkv, dtype, seq_len=48)
    doc = _packed_doc_ids(B, 48)
    scale = 0.3
    q_idx = zigzag_indices(48, 3, 0)
    q_doc = doc[:, q_idx]
    all_idx = torch.arange(48)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q[:, q_idx], k, v))
    _dense_attention(qr, kr, vr, q_idx, all_idx, q_doc, doc, scale).backward(dout[:, q_idx])
    out, lse = reference_block_forward(q[:, q_idx], k, v, q_idx, all_idx, q_doc, doc, scale)
    dq = torch.zeros_like(q[:, q_idx])
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for k_idx in _blocks(48, 3):
        dq_i, dk_i, dv_i = reference_block_backward(dout[:, q_idx], q[:, q_idx], k[:, k_idx], v[:, k_idx], out, lse,
                                                    q_idx, k_idx, q_doc, doc[:, k_idx], scale)
        assert dq_i.dtype == dk_i.dtype == dtype
        dq += dq_i
        dk[:, k_idx] += dk_i
        dv[:, k_idx] += dv_i
    for got, ref in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert _err(got, ref) < tol


@pytest.mark.parametrize("docs", [False, True])
def test_fully_masked_rows(docs):
    q, k, v, dout = _inputs(1, torch.float64, seq_len=16)
    if docs:  # keys earlier than the queries but all in another document
        q_idx, k_idx = torch.arange(8, 16), torch.arange(0, 8)
        q_doc, k_doc = torch.ones(B, 8, dtype=torch.long), torch.zeros(B, 8, dtype=torch.long)
    else:  # keys all later than the queries
        q_idx, k_idx, q_doc, k_doc = torch.arange(0, 8), torch.arange(8, 16), None, None
    assert not has_visible_keys(q_idx, k_idx, q_doc, k_doc)
    out, lse = reference_block_forward(q[:, :8], k[:, 8:], v[:, 8:], q_idx, k_idx, q_doc, k_doc, 1.0)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    other_out, other_lse = torch.randn_like(out), torch.randn_like(lse)
    merged, merged_lse = merge_partials(out, lse, other_out, other_lse)
    assert torch.equal(merged, other_out) and torch.equal(merged_lse, other_lse)
    merged, merged_lse = merge_partials(out, lse, out, lse)
    assert torch.equal(merged, out) and bool(torch.isneginf(merged_lse).all())
    grads = reference_block_backward(dout[:, :8], q[:, :8], k[:, 8:], v[:, 8:], out, lse, q_idx, k_idx,
                                     q_doc, k_doc, 1.0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("hkv", [4, 1])
def test_ring_of_one_is_local_attention(hkv):
    q, k, v, dout = _inputs(hkv, torch.float64)
    doc = _packed_doc_ids(B, S)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    local_attention(*ref, doc_ids=doc).backward(dout)
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    stats = RingStats()
    out = ring_attention(*got, doc_ids=doc, group=None, seq_idx=torch.arange(S), stats=stats)
    out.backward(dout)
    assert _err(out, local_attention(q, k, v, doc_ids=doc)) < FP64_TOL
    assert all(_err(a.grad, b.grad) < FP64_TOL for a, b in zip(got, ref))
    assert stats.fwd_bytes_sent == 0 and stats.blocks_computed == 1


def test_bfloat16_runs_in_fp32():
    q, k, v, dout = _inputs(1, torch.float64)
    doc = _packed_doc_ids(B, S)
    ref = local_attention(q, k, v, doc_ids=doc)
    got = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*got, doc_ids=doc, group=None, seq_idx=torch.arange(S))
    out.backward(dout.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in got)
    assert _err(out, ref) < 3e-2  # bf16 inputs and output: ~3 significant digits


# ---------------------------------------------------------------- gloo rings



def _run_case(group, docs: bool, hkv: int, dtype: torch.dtype, zigzag: bool = True, module: bool = False) -> dict:
    """Ring forward/backward on zigzag (or contiguous) shards vs. local_attention on the full sequence;
    ``module``: through :class:`RingAttention`, which takes the zigzag length from the rows (the model's
    attention function at any length: training, evaluation beyond it, a planner's short warm-up)."""
    ring_size, ring_rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, dout = _inputs(hkv, dtype)
    doc = _packed_doc_ids(B, S) if docs else None
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = local_attention(*ref, doc_ids=doc)
    out_ref.backward(dout)
    if zigzag:
        shard, unshard = (lambda t: zigzag_shard(t, ring_size, ring_rank)), (lambda p: zigzag_unshard(p, ring_size))
    else:  # contiguous shards: ranks see later blocks that are entirely masked and get skipped
        shard, unshard = (lambda t: t.chunk(ring_size, dim=1)[ring_rank].contiguous()), (lambda p: torch.cat(p, 1))
    local = [shard(t).requires_grad_() for t in (q, k, v)]
    doc_local = None if doc is None else shard(doc)
    stats = RingStats()
    if module:
        out = RingAttention(group, stats)(*local, doc_ids=doc_local)
    elif zigzag:
        out = zigzag_ring_attention(*local, doc_ids=doc_local, group=group, seq_len=S, stats=stats)
    else:
        out = ring_attention(*local, doc_ids=doc_local, group=group, seq_idx=shard(torch.arange(S)[None])[0],
                             stats=stats)
    fwd_bytes = stats.fwd_bytes_sent
    out.backward(shard(dout))
    errs = {}
    for name, mine, full in zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in local],
                                [out_ref] + [t.grad for t in ref]):
        parts = [torch.empty_like(mine) for _ in range(ring_size)]
        dist.all_gather(parts, mine.contiguous(), group=group)
        errs[name] = _err(unshard(parts), full)
    kv_bytes = sum(t.numel() * t.element_size() for t in local[1:])
    meta_bytes = (S // ring_size) * 8 + (0 if doc_local is None else doc_local.numel() * doc_local.element_size())
    acc_bytes = sum(t.numel() for t in local[1:]) * (8 if dtype == torch.float64 else 4)
    return dict(errs=errs, tol=FP64_TOL if dtype == torch.float64 else FP32_TOL, skipped=stats.blocks_skipped,
                fwd_bytes=fwd_bytes, want_fwd_bytes=(ring_size - 1) * (kv_bytes + meta_bytes),
                bwd_bytes=stats.bwd_bytes_sent,
                want_bwd_bytes=(ring_size - 1) * kv_bytes + ring_size * acc_bytes)


def _worker(rank: int, world: int) -> dict:
    results = {}
    for docs in (False, True):
        for hkv in (HQ, 1):
            results[f"docs={docs} hkv={hkv} fp64"] = _run_case(dist.group.WORLD, docs, hkv, torch.float64)
    results["docs=True hkv=1 fp32"] = _run_case(dist.group.WORLD, True, 1, torch.float32)
    results["RingAttention docs=True hkv=1 fp64"] = _run_case(dist.group.WORLD, True, 1, torch.float64, module=True)
    for docs in (False, True):
        results[f"contiguous docs={docs} hkv=1 fp64"] = _run_case(dist.group.WORLD, docs, 1, torch.float64,
                                                                  zigzag=False)
    if world == 4:  # rings of strided ranks, as ParallelDims builds them when ulysses > 1
        rings = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        results["subgroup docs=True hkv=1 fp64"] = _run_case(rings[rank % 2], True, 1, torch.float64)
    # A merge that drops every block but the first must fail the comparison.
    good_merge = ring_mod.merge_partials
    ring_mod.merge_partials = lambda out_a, lse_a, out_b, lse_b: (out_a, lse_a)
    try:
        results["broken merge"] = _run_case(dist.group.WORLD, True, 1, torch.float64)
    finally:
        ring_mod.merge_partials = good_merge
    dist.barrier()
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_local(world):
    for rank, results in enumerate(run_ranks(_worker, world)):
        broken = results.pop("broken merge")
        # Zigzag shards never leave a whole block masked; contiguous ones skip the R-1-rank later
        # blocks, and with documents also earlier blocks that share no document with the queries.
        assert results["contiguous docs=False hkv=1 fp64"]["skipped"] == world - 1 - rank
        assert results["contiguous docs=True hkv=1 fp64"]["skipped"] >= world - 1 - rank
        assert results["docs=True hkv=1 fp64"]["skipped"] == 0
        with pytest.raises(ValueError, match=r"data\.seq_len=41 must be divisible by 2 \* parallel\.sp\.ring = 2"):
            RingAttention(None)(*(torch.zeros(1, 41, 1, 8),) * 3)  # a length the zigzag cut cannot take
        assert broken["errs"]["out"] > 1e-2, "a dropped ring block went unnoticed"
        for name, case in results.items():
            for tensor, err in case["errs"].items():
                assert err < case["tol"], f"rank {rank} {name} {tensor}: max error {err:.3g}"
            assert case["fwd_bytes"] == case["want_fwd_bytes"], name
            assert case["bwd_bytes"] == case["want_bwd_bytes"], name
