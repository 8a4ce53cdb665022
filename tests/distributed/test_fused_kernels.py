"""Fused block kernels (segment plan + flash-attention executors, chosen by the dispatch of
longtrain/kernels/dispatch.py) against the reference kernels.

On CPU the fused kernels run the planner and the lse/backward plumbing with
``aten._scaled_dot_product_flash_attention_for_cpu``; the CUDA varlen executor shares the plan
and is checked by the ``gpu`` tests. Tolerances: fp64 sums in another order agree to ~1e-15, so
1e-10 catches any masking error (those are 1e-2 and more); fp32 is checked at 1e-5; bf16 flash
against the fp32 reference at 2e-2 (bf16 keeps ~3 significant digits).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist

from longtrain.kernels.attention import local_attention
from longtrain.kernels.blocks import merge_partials, reference_block_backward, reference_block_forward
from longtrain.kernels.dispatch import KERNEL_STATS, AttentionKernels
from longtrain.kernels.fused import loop_forward, plan_segments
from longtrain.parallel.sharding import zigzag_indices, zigzag_shard, zigzag_unshard
from support.emulated import EmulatedFlash
from support.harness import run_ranks

FP64_TOL, FP32_TOL = 1e-10, 1e-5
B, S, HQ, D = 2, 48, 4, 8
KERNELS = AttentionKernels("flash")
fused_block_forward, fused_block_backward = KERNELS.forward, KERNELS.backward


def _docs(batch: int, seq_len: int) -> torch.Tensor:
    """Packed documents with boundaries inside zigzag chunks, one spanning several chunks, and a
    one-token document."""
    rows = []
    for lengths in ([5, 30, 1, 4], [17, 1, 2, 20])[:batch]:
        lengths = lengths + [seq_len - sum(lengths)]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


def _inputs(hkv: int, dtype: torch.dtype, seq_len: int = S, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, seq_len, HQ, D), (B, seq_len, hkv, D), (B, seq_len, hkv, D), (B, seq_len, HQ, D)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).nan_to_num(0.0, 0.0, 0.0).abs().max().item()


def _ring_blocks(q, k, v, dout, doc, ring: int, rank: int, fwd, bwd, scale: float = 0.3):
    """What ring rank ``rank`` computes: every block's forward merged, then every block's backward
    from the merged statistics. Returns (out, lse, dq, [(dk_i, dv_i) per block])."""
    q_idx = zigzag_indices(q.shape[1], ring, rank)
    q_doc = None if doc is None else doc[:, q_idx]
    out = lse = None
    for s in range(ring):
        k_idx = zigzag_indices(q.shape[1], ring, s)
        o, l = fwd(q[:, q_idx], k[:, k_idx], v[:, k_idx], q_idx, k_idx, q_doc,
                   None if doc is None else doc[:, k_idx], scale)
        out, lse = (o, l) if out is None else merge_partials(out, lse, o, l)
    out = out.to(q.dtype)
    dq, dkv = torch.zeros_like(q[:, q_idx]), []
    for s in range(ring):
        k_idx = zigzag_indices(q.shape[1], ring, s)
        dq_i, dk_i, dv_i = bwd(dout[:, q_idx], q[:, q_idx], k[:, k_idx], v[:, k_idx], out, lse, q_idx, k_idx,
                               q_doc, None if doc is None else doc[:, k_idx], scale)
        dq += dq_i
        dkv += [dk_i, dv_i]
    return [out, lse, dq] + dkv


@pytest.mark.parametrize("ring", [1, 2, 3, 4])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_fused_matches_reference_on_every_zigzag_block(ring, docs, hkv, dtype, tol):
    q, k, v, dout = _inputs(hkv, dtype)
    doc = _docs(B, S) if docs else None
    KERNEL_STATS.reset()
    for rank in range(ring):
        want = _ring_blocks(q, k, v, dout, doc, ring, rank, reference_block_forward, reference_block_backward)
        got = _ring_blocks(q, k, v, dout, doc, ring, rank, fused_block_forward, fused_block_backward)
        for name, a, b in zip(["out", "lse", "dq"] + ["dk/dv"] * 2 * ring, got, want):
            if name == "lse":
                assert torch.equal(torch.isneginf(a), torch.isneginf(b))
            assert a.dtype == b.dtype, name
            assert _err(a, b) < tol, f"rank {rank} {name}: {_err(a, b):.3g}"
    assert KERNEL_STATS.calls == {"cudnn": 0, "flash": 0, "cpu": 2 * ring * ring, "reference": 0, "fallback": 0}


def _columns(seg):
    return [tuple(t.tolist()) for t in (seg.q0, seg.q1, seg.k0, seg.k1, seg.causal)]


def test_plan_of_zigzag_blocks_pairs_each_run_with_its_prefix_and_diagonal():
    # Ring of 2 over 16 tokens: rank 0 holds [0, 4) and [12, 16), rank 1 holds [4, 12).
    rank0, rank1 = zigzag_indices(16, 2, 0), zigzag_indices(16, 2, 1)
    # Rank 0's queries over rank 1's keys: [0, 4) sees none; [12, 16) sees all eight, densely.
    assert _columns(plan_segments(rank0, rank1, None, None, batch=1)) == [(4,), (8,), (0,), (8,), (False,)]
    # Its own block: [0, 4) is causal over itself; [12, 16) over [0, 4) (prefix) and itself (diagonal).
    assert _columns(plan_segments(rank0, rank0, None, None, batch=1)) == \
        [(0, 4), (4, 8), (0, 0), (4, 8), (True, True)]
    # Documents split the groups; document 1 spans the gap, so [12, 14) also sees [2, 4).
    doc = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2]])
    assert _columns(plan_segments(rank0, rank0, doc, doc, batch=1)) == \
        [(0, 2, 4, 6), (2, 4, 6, 8), (0, 2, 2, 6), (2, 4, 6, 8), (True, True, True, True)]


@pytest.mark.parametrize("case", ["partial diagonal", "unsorted", "decreasing docs"])
def test_blocks_without_a_plan_fall_back_to_the_reference(case):
    q, k, v, dout = _inputs(1, torch.float64, seq_len=16)
    q_idx, k_idx, doc = torch.arange(8, 16), torch.arange(4, 12), None
    if case == "unsorted":
        q_idx = q_idx.flip(0)
    if case == "decreasing docs":
        k_idx, doc = torch.arange(0, 8), torch.tensor([[0] * 8 + [1] * 4 + [0] * 4] * B)
    q_doc, k_doc = (None, None) if doc is None else (doc[:, 8:], doc[:, :8])
    assert plan_segments(q_idx, k_idx, q_doc, k_doc, B) is None
    args = (q[:, :8], k[:, :8], v[:, :8], q_idx, k_idx, q_doc, k_doc, 0.5)
    KERNEL_STATS.reset()
    out, lse = fused_block_forward(*args)
    want_out, want_lse = reference_block_forward(*args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse) and KERNEL_STATS.calls["fallback"] == 1
    grads = fused_block_backward(dout[:, :8], *args[:3], out, lse, *args[3:])
    want = reference_block_backward(dout[:, :8], *args[:3], out, lse, *args[3:])
    assert all(torch.equal(a, b) for a, b in zip(grads, want))


def test_a_wrong_plan_is_caught():
    """The parity check can fail: a plan that lets rank 1's queries see keys [12, 16) is far off."""
    q, k, v, dout = _inputs(1, torch.float64, seq_len=16)
    q_idx, k_idx = zigzag_indices(16, 2, 1), zigzag_indices(16, 2, 0)
    seg = plan_segments(q_idx, k_idx, None, None, batch=B)
    assert _columns(seg)[3] == (4, 4)
    seg.k1[:] = 8
    out, _ = loop_forward(q[:, q_idx].contiguous(), k[:, k_idx].contiguous(), v[:, k_idx].contiguous(), seg, 0.3)
    want, _ = reference_block_forward(q[:, q_idx], k[:, k_idx], v[:, k_idx], q_idx, k_idx, None, None, 0.3)
    assert _err(out, want) > 1e-2


@pytest.mark.parametrize("hkv", [4, 1])
def test_fused_whole_sequence_block_matches_local_attention(hkv):
    q, k, v, dout = _inputs(hkv, torch.float64)
    doc = _docs(B, S)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    local_attention(*ref, doc_ids=doc).backward(dout)
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    out = KERNELS.attention(*got, torch.arange(S), torch.arange(S), doc, doc, 1 / math.sqrt(D))
    out.backward(dout)
    assert _err(out, local_attention(q, k, v, doc_ids=doc)) < FP64_TOL
    assert all(_err(a.grad, b.grad) < FP64_TOL for a, b in zip(got, ref))


# ---------------------------------------------------------------- the ring on gloo with fused kernels
def _worker(rank: int, world: int) -> dict:
    from longtrain.parallel.ring import zigzag_ring_attention
    KERNEL_STATS.reset()
    errs = {}
    for docs, hkv in itertools.product((False, True), (HQ, 1)):
        q, k, v, dout = _inputs(hkv, torch.float64, seq_len=64)
        doc = _docs(B, 64) if docs else None
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        local_attention(*ref, doc_ids=doc).backward(dout)
        local = [zigzag_shard(t, world, rank).requires_grad_() for t in (q, k, v)]
        out = zigzag_ring_attention(*local, doc_ids=None if doc is None else zigzag_shard(doc, world, rank),
                                    group=None, seq_len=64, kernels=KERNELS)
        out.backward(zigzag_shard(dout, world, rank))
        for name, mine, full in zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in local],
                                    [local_attention(q, k, v, doc_ids=doc)] + [t.grad for t in ref]):
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine.contiguous())
            errs[f"docs={docs} hkv={hkv} {name}"] = _err(zigzag_unshard(parts, world), full)
    errs["fallbacks"] = KERNEL_STATS.calls["fallback"] + KERNEL_STATS.calls["reference"]
    errs["fused"] = KERNEL_STATS.calls["cpu"]
    return errs


def test_ring_with_fused_kernels_matches_local():
    world = 2
    for rank, errs in enumerate(run_ranks(_worker, world)):
        assert errs.pop("fallbacks") == 0 and errs.pop("fused") > 0
        for name, err in errs.items():
            assert err < FP64_TOL, f"rank {rank} {name}: {err:.3g}"


# ---------------------------------------------------------------- CUDA (flash attention varlen)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("ring", [1, 2, 4])
def test_cuda_varlen_matches_reference(ring, hkv, docs):
    q, k, v, dout = _inputs(hkv, torch.bfloat16, seq_len=256, device="cuda")
    doc = _docs(B, 256).cuda() if docs else None
    KERNEL_STATS.reset()
    for rank in range(ring):
        want = _ring_blocks(*(t.float() for t in (q, k, v, dout)), doc, ring, rank, reference_block_forward,
                            reference_block_backward)
        got = _ring_blocks(q, k, v, dout, doc, ring, rank, fused_block_forward, fused_block_backward)
        for name, a, b in zip(["out", "lse", "dq"] + ["dk/dv"] * 2 * ring, got, want):
            scale = b.double().abs().max().item() + 1.0
            assert _err(a, b) < 2e-2 * scale, f"rank {rank} {name}: {_err(a, b):.3g}"
    assert KERNEL_STATS.calls["fallback"] == KERNEL_STATS.calls["reference"] == 0 < KERNEL_STATS.calls["flash"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_local_attention_with_documents_uses_varlen():
    q, k, v, dout = _inputs(1, torch.bfloat16, seq_len=512, device="cuda")
    doc = _docs(B, 512).cuda()
    KERNEL_STATS.reset()
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    local_attention(*got, doc_ids=doc).backward(dout)
    assert KERNEL_STATS.calls["flash"] == 2  # forward and backward, one varlen call each per causality
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    want = reference_block_forward(*ref, torch.arange(512, device="cuda"), torch.arange(512, device="cuda"),
                                   doc, doc, 1 / math.sqrt(D))[0]
    want.backward(dout.float())
    for a, b in zip(got, ref):
        assert _err(a.grad, b.grad) < 2e-2 * (b.grad.abs().max().item() + 1.0)


# ---------------------------------------------------------------- the CUDA executor's plumbing on CPU
@pytest.mark.parametrize("hkv", [4, 2])
def test_a_one_segment_block_runs_one_backward_call_per_kv_head(monkeypatch, hkv):
    """A block of one segment (one row, one document: local attention whole, or a StreamBP chunk over
    its key prefix) runs its backward as one flash call per KV head with that head's query heads, each
    writing its own dK/dV (nothing summed in fp32 over the prefix); checked against the reference
    with the flash ops emulated, and the calls counted."""
    from longtrain.kernels import fused as fk
    emulated = EmulatedFlash()
    calls = []

    def backward(*args, **kwargs):
        calls.append(args[2].shape[1])  # the KV heads of the call
        return emulated.backward(*args, **kwargs)

    monkeypatch.setattr(fk, "_RNG_META", {})
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", emulated.forward, raising=False)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", backward, raising=False)
    kernels = AttentionKernels("flash", cuda_device_types=("cpu",), cuda_dtypes=(torch.float32,))
    q, k, v, dout = (t[:1] for t in _inputs(hkv, torch.float32))
    for q0, q1 in ((0, S), (16, 32)):  # the whole sequence; a chunk of queries over its key prefix
        calls.clear()
        q_idx, k_idx = torch.arange(q0, q1), torch.arange(0, q1)
        block = (q[:, q0:q1], k[:, :q1], v[:, :q1], q_idx, k_idx, None, None, 0.3)
        assert len(plan_segments(q_idx, k_idx, None, None, 1)) == 1
        out, lse = kernels.forward(*block)
        want_out, want_lse = reference_block_forward(*block)
        got = kernels.backward(dout[:, q0:q1], *block[:3], out, lse, *block[3:])
        want = reference_block_backward(dout[:, q0:q1], *block[:3], want_out, want_lse, *block[3:])
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *got), (want_out, want_lse, *want)):
            assert _err(a, b) < FP32_TOL, f"[{q0}, {q1}) {name}: {_err(a, b):.3g}"
        assert calls == [1] * hkv


@pytest.mark.parametrize("calls", ["per segment", "one varlen call"])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_varlen_executor_plumbing_with_an_emulated_flash_op(monkeypatch, docs, hkv, calls):
    """The gathers, cumulative lengths, lse layout and scatters of the CUDA executor, checked on CPU
    against the reference with the flash ops replaced by dense stand-ins of the same contract: one
    call per segment (views, and per query head of each KV group in the backward: ``hkv=2`` and 1
    are Hq/Hkv = 2 and 4) and, with the segment limit at zero, one varlen call for all of them."""
    from longtrain.kernels import fused as fk
    emulated = EmulatedFlash()
    monkeypatch.setattr(fk, "_RNG_META", {})
    if calls == "one varlen call":
        monkeypatch.setattr(fk, "SEGMENT_CALLS", 0)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", emulated.forward, raising=False)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", emulated.backward, raising=False)
    # CPU fp32 tensors taken as CUDA's (the planner's seam), on the flash backend: the varlen executor
    kernels = AttentionKernels("flash", cuda_device_types=("cpu",), cuda_dtypes=(torch.float32,))
    fused_block_forward, fused_block_backward = kernels.forward, kernels.backward
    KERNEL_STATS.reset()
    q, k, v, dout = _inputs(hkv, torch.float32)
    doc = _docs(B, S) if docs else None
    for rank in range(3):
        want = _ring_blocks(q, k, v, dout, doc, 3, rank, reference_block_forward, reference_block_backward)
        got = _ring_blocks(q, k, v, dout, doc, 3, rank, fused_block_forward, fused_block_backward)
        for name, a, b in zip(["out", "lse", "dq"] + ["dk/dv"] * 6, got, want):
            assert _err(a, b) < FP32_TOL, f"rank {rank} {name}: {_err(a, b):.3g}"
    assert KERNEL_STATS.calls["flash"] == 2 * 9 and KERNEL_STATS.fused == 2 * 9
