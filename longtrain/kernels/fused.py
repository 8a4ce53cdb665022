"""Flash-attention executors of attention blocks: one plan of dense segments per block.

The block contract of :mod:`longtrain.kernels.blocks` (queries and keys carrying global token
indices and document ids, output plus log-sum-exp, backward from the merged statistics) is met
here by cutting the block into *segments* that a fused kernel computes directly:

    segment = (row b, query positions [q0, q1), key positions [k0, k1), causal)

Queries are grouped into runs of consecutive indices within one document. For such a group with
indices ``[a, a+n)`` and document ``d`` the visible keys are the block's keys of document ``d``
with index ``< a`` (visible to every query of the group) followed, if the block holds them, by the
keys with indices ``[a, a+n)`` (the diagonal). Because keys are sorted by index and, within a row,
by document, both sets are one contiguous range of key positions. A group with a diagonal is a
*causal* segment in flash attention's bottom-right alignment (query ``i`` sees key ``j`` iff
``j <= i + (k1-k0) - (q1-q0)``); a group without one is a dense segment; a group with neither sees
nothing (output 0, lse -inf, as in the reference). Every query lies in at most one segment, so no
merge is needed inside a block, and keys no query can see are never touched.

The plan covers the layouts longtrain produces (contiguous and zigzag shards, Ulysses-gathered
sequences, document ids that never decrease along a row). Blocks outside it (a diagonal only
partly present, indices out of order, document ids that decrease) return ``None`` from
:func:`plan_segments`; :mod:`longtrain.kernels.dispatch`, which chooses the executor of every
block, then runs the reference kernels.

Executors:
    ``varlen`` (CUDA): flash attention's varlen API (``aten._flash_attention_forward`` /
        ``_flash_attention_backward`` with cumulative sequence lengths; lse ``[H, total_q]`` in fp32,
        bottom-right causal alignment). A block of up to :data:`SEGMENT_CALLS` segments runs one
        call per segment on views of the block's tensors (no gathered copies), its backward one per
        query head of each KV group (dK/dV never expanded to the query heads, which the GQA backward
        of one call does); a block of one segment and several KV heads, one backward call per KV
        head with its query heads, writing that head's dK/dV directly (no fp32 sum over the key
        prefix); a block of more runs all segments of one causality in a single call.
    ``loop`` (CPU): one ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward) per
        segment, the bottom-right diagonal as an additive mask: the CPU's fused path, and the
        lse/backward plumbing shared with the CUDA path tested on CPU against the reference.

Layout legend: as :mod:`longtrain.kernels.blocks`; ``*_thd`` [total_tokens, heads, head_dim] is
a varlen concatenation of segments, ``lse_ht`` [heads, total_tokens].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from longtrain.kernels.blocks import check_docs


@dataclass
class Segments:
    """Dense segments of one block; every field is a CPU int64 (``causal``: bool) tensor [num_segments]."""

    row: torch.Tensor
    q0: torch.Tensor
    q1: torch.Tensor
    k0: torch.Tensor
    k1: torch.Tensor
    causal: torch.Tensor

    def select(self, keep: torch.Tensor) -> "Segments":
        return Segments(*(t[keep] for t in (self.row, self.q0, self.q1, self.k0, self.k1, self.causal)))

    def __len__(self) -> int:
        return self.row.numel()


def _ascending(x: torch.Tensor, strict: bool) -> bool:
    if x.shape[-1] < 2:
        return True
    step = x[..., 1:] - x[..., :-1]
    return bool((step > 0).all()) if strict else bool((step >= 0).all())


def _row_segments(q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: Optional[torch.Tensor],
                  k_doc: Optional[torch.Tensor]) -> Optional[Tuple[torch.Tensor, ...]]:
    """(q0, q1, k0, k1, causal) of one row's visible segments; None when a diagonal is partial."""
    num_q, num_k = q_idx.numel(), k_idx.numel()
    cut = q_idx[1:] != q_idx[:-1] + 1
    if q_doc is not None:
        cut |= q_doc[1:] != q_doc[:-1]
    q0 = torch.cat([torch.zeros(1, dtype=torch.long), cut.nonzero().flatten() + 1])
    q1 = torch.cat([q0[1:], torch.tensor([num_q])])
    first = q_idx[q0]
    size = q1 - q0
    if q_doc is None:
        doc_lo, doc_hi = torch.zeros_like(q0), torch.full_like(q0, num_k)
    else:
        doc = q_doc[q0].contiguous()
        doc_lo = torch.searchsorted(k_doc, doc, right=False)
        doc_hi = torch.searchsorted(k_doc, doc, right=True)
    before = torch.searchsorted(k_idx, first)          # keys with index < a
    through = torch.searchsorted(k_idx, first + size)  # keys with index < a + n
    prefix_hi = torch.minimum(doc_hi, before)
    has_prefix = prefix_hi > doc_lo
    diag_lo = torch.maximum(doc_lo, before)
    diag_len = (torch.minimum(doc_hi, through) - diag_lo).clamp(min=0)
    if bool(((diag_len > 0) & (diag_len != size)).any()):
        return None  # only part of a diagonal is in the block: not a flash-attention shape
    causal = diag_len > 0
    k0 = torch.where(has_prefix, doc_lo, diag_lo)
    k1 = torch.where(causal, diag_lo + diag_len, prefix_hi)
    keep = has_prefix | causal
    return q0[keep], q1[keep], k0[keep], k1[keep], causal[keep]


def plan_segments(q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: Optional[torch.Tensor],
                  k_doc: Optional[torch.Tensor], batch: int) -> Optional[Segments]:
    """Cut a block into dense segments (see the module docstring); None if it has no such plan.

    Args:
        q_idx: [Sq] global indices of the queries; k_idx: [Sk] of the keys.
        q_doc: [B, Sq] document ids of the queries, or None; k_doc: [B, Sk], or None.
        batch: B (the rows share the segments when there are no documents).

    Returns:
        The segments of every row, or None when the indices are not strictly increasing, the
        document ids decrease along a row, or a query group's diagonal is only partly present.
    """
    check_docs(q_doc, k_doc)
    q_idx, k_idx = q_idx.detach().to("cpu", torch.long), k_idx.detach().to("cpu", torch.long)
    if not (_ascending(q_idx, strict=True) and _ascending(k_idx, strict=True)):
        return None
    if q_doc is not None:
        q_doc, k_doc = q_doc.detach().to("cpu", torch.long), k_doc.detach().to("cpu", torch.long)
        if not (_ascending(q_doc, strict=False) and _ascending(k_doc, strict=False)):
            return None
    rows, parts = [], []
    for b in range(batch if q_doc is not None else 1):
        part = _row_segments(q_idx, k_idx, None if q_doc is None else q_doc[b], None if k_doc is None else k_doc[b])
        if part is None:
            return None
        rows.append(torch.full_like(part[0], b))
        parts.append(part)
    if q_doc is None:  # one plan for every row
        part = parts[0]
        rows = [torch.arange(batch).repeat_interleave(part[0].numel())]
        parts = [tuple(t.repeat(batch) for t in part)]
    cols = [torch.cat(c) for c in zip(*parts)]
    return Segments(torch.cat(rows), *cols)


# ---------------------------------------------------------------------------- gathering segments
def _flat_index(row: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, row_len: int) -> torch.Tensor:
    """Flat positions in a [B * row_len] view of every ``[lo, hi)`` of ``row``, concatenated."""
    lens = hi - lo
    total = int(lens.sum())
    offsets = torch.cumsum(lens, 0) - lens
    return torch.repeat_interleave(row * row_len + lo - offsets, lens) + torch.arange(total)


def _cu_seqlens(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(hi - lo, 0)]).to(torch.int32)


# ---------------------------------------------------------------------------- executors
_RNG_META: Dict[str, Tuple[Tuple[tuple, torch.dtype], ...]] = {}
"""Per device type: the (shape, dtype) of the (rng_state, unused) pair flash attention's forward
returns, learned from the forward's own answer."""


def _rng_state(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (rng_state, unused) pair the flash backward takes: ignored without dropout, but it must
    have the forward's types (torch versions differ), so they are made fresh in the shapes and dtypes
    a forward on this device type returned; nothing is kept alive between calls (a cache of tensors
    would be a few bytes the first step has and no later plan does)."""
    return tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in _RNG_META[device.type])


def _varlen_groups(seg: Segments, device: torch.device, num_q: int, num_k: int):
    """Per causality: (causal, flat query index, flat key index, cu_q, cu_k, max_q, max_k), on ``device``."""
    for causal in (False, True):
        part = seg.select(seg.causal == causal)
        if len(part) == 0:
            continue
        yield (causal, _flat_index(part.row, part.q0, part.q1, num_q).to(device),
               _flat_index(part.row, part.k0, part.k1, num_k).to(device),
               _cu_seqlens(part.q0, part.q1).to(device), _cu_seqlens(part.k0, part.k1).to(device),
               int((part.q1 - part.q0).max()), int((part.k1 - part.k0).max()))


SEGMENT_CALLS = 64
"""A block of at most this many segments runs one flash call per segment on views of q, k and v
(:func:`_spans`), in the backward one per query head of each KV group. The varlen call gathers every
segment's keys into one tensor (a copy; several times the block's keys where segments share a key
prefix, as the slices of a Ulysses chunk do) and its backward expands dK and dV of those keys to every
query head under GQA: for Llama-3.1-8B at 2.9M tokens over Ulysses 8, 4 x 3.2 GiB of gathered keys
and values and their gradients and a 25.6 GiB workspace, none of which the per-segment calls make.
More segments (many short documents, each seeing only its own keys) run in one varlen call."""


def _spans(seg: Segments, num_q: int, num_k: int):
    """(qa, qb, ka, kb, causal) per segment: its rows in the flat [B * num_q] queries and [B * num_k] keys."""
    for b, q0, q1, k0, k1, causal in zip(*(t.tolist() for t in (seg.row, seg.q0, seg.q1, seg.k0, seg.k1,
                                                                   seg.causal))):
        yield b * num_q + q0, b * num_q + q1, b * num_k + k0, b * num_k + k1, bool(causal)


def _one_sequence(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([0, n], dtype=torch.int32, device=device)


def _segments_forward(q_thd, k_thd, v_thd, out_thd, lse_ht, seg: Segments, num_q: int, num_k: int, scale: float):
    for qa, qb, ka, kb, causal in _spans(seg, num_q, num_k):
        out, lse, *rng = torch.ops.aten._flash_attention_forward(
            q_thd[qa:qb], k_thd[ka:kb], v_thd[ka:kb], _one_sequence(qb - qa, q_thd.device),
            _one_sequence(kb - ka, q_thd.device), qb - qa, kb - ka, 0.0, causal, False, scale=scale)[:4]
        _RNG_META.setdefault(q_thd.device.type, tuple((tuple(t.shape), t.dtype) for t in rng))
        out_thd[qa:qb] = out
        lse_ht[:, qa:qb] = lse


def _segments_backward(do_thd, q_thd, k_thd, v_thd, out_thd, lse_ht, dq_thd, dk_thd, dv_thd, seg: Segments,
                       num_q: int, num_k: int, scale: float):
    """Per segment and per position ``j`` in the KV groups: query heads ``j, j + g, ...`` (one per KV
    head, in KV-head order: head ``h`` reads KV head ``h // g``) against the whole K/V, so the op's
    dK/dV are the KV heads' own, never expanded to the query heads."""
    group = q_thd.shape[1] // k_thd.shape[1]
    rng = _rng_state(q_thd.device)
    for span in _spans(seg, num_q, num_k):
        qa, qb, ka, kb, causal = span
        cu = (_one_sequence(qb - qa, q_thd.device), _one_sequence(kb - ka, q_thd.device))
        for j in range(group):
            dk, dv = _heads_backward(do_thd, q_thd, out_thd, lse_ht, dq_thd, k_thd[ka:kb], v_thd[ka:kb],
                                     slice(j, None, group), span, cu, rng, scale)
            dk_thd[ka:kb] += dk
            dv_thd[ka:kb] += dv


def _heads_backward(do_thd, q_thd, out_thd, lse_ht, dq_thd, k, v, heads: slice, span, cu, rng, scale: float):
    """One flash backward call: the query heads ``heads`` of segment ``span`` (:func:`_spans`; ``cu``
    its cumulative lengths, ``rng`` :func:`_rng_state`'s pair) against ``k``/``v`` (its keys, as many
    heads as ``heads`` selects or one to share); writes their dQ into ``dq_thd`` and returns the
    call's dK, dV."""
    qa, qb, ka, kb, causal = span
    do, q, out = (t[qa:qb, heads].contiguous() for t in (do_thd, q_thd, out_thd))
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        do, q, k, v, out, lse_ht[heads, qa:qb].contiguous(), *cu, qb - qa, kb - ka, 0.0, causal, *rng, scale=scale)
    dq_thd[qa:qb, heads] = dq
    return dk, dv


def _one_segment_backward(do_thd, q_thd, k_thd, v_thd, out_thd, lse_ht, dq_thd, seg: Segments, num_q: int,
                          num_k: int, scale: float):
    """A block of one segment (local attention's StreamBP chunk over its key prefix): one call per KV
    head, its ``g`` query heads against it, each writing its own KV head's dK/dV in K's dtype: no fp32
    accumulator over the prefix (nothing is summed) and a GQA expansion of one KV head's keys only.
    Returns dK, dV [B * num_k, Hkv, D] (zero outside the segment's keys)."""
    kv_heads = k_thd.shape[1]
    group = q_thd.shape[1] // kv_heads
    dk_thd, dv_thd = torch.zeros_like(k_thd), torch.zeros_like(v_thd)
    span = next(_spans(seg, num_q, num_k))
    qa, qb, ka, kb, causal = span
    cu, rng = (_one_sequence(qb - qa, q_thd.device), _one_sequence(kb - ka, q_thd.device)), _rng_state(q_thd.device)
    for c in range(kv_heads):
        k, v = (t[ka:kb, c:c + 1].contiguous() for t in (k_thd, v_thd))
        dk, dv = _heads_backward(do_thd, q_thd, out_thd, lse_ht, dq_thd, k, v, slice(c * group, (c + 1) * group),
                                 span, cu, rng, scale)
        dk_thd[ka:kb, c:c + 1] = dk
        dv_thd[ka:kb, c:c + 1] = dv
    return dk_thd, dv_thd


def varlen_forward(q_bshd, k_bshd, v_bshd, seg: Segments, scale: float):
    batch, num_q, heads, dim = q_bshd.shape
    num_k = k_bshd.shape[1]
    q_thd, k_thd, v_thd = q_bshd.reshape(-1, heads, dim), k_bshd.flatten(0, 1), v_bshd.flatten(0, 1)
    out_thd = torch.zeros_like(q_thd)
    lse_ht = torch.full((heads, batch * num_q), float("-inf"), dtype=torch.float32, device=q_bshd.device)
    if len(seg) <= SEGMENT_CALLS:
        _segments_forward(q_thd, k_thd, v_thd, out_thd, lse_ht, seg, num_q, num_k, scale)
        return out_thd.view(q_bshd.shape), lse_ht.view(heads, batch, num_q).transpose(0, 1)
    for causal, qi, ki, cu_q, cu_k, max_q, max_k in _varlen_groups(seg, q_bshd.device, num_q, num_k):
        out, lse, *rng = torch.ops.aten._flash_attention_forward(
            q_thd.index_select(0, qi), k_thd.index_select(0, ki), v_thd.index_select(0, ki), cu_q, cu_k,
            max_q, max_k, 0.0, causal, False, scale=scale)[:4]
        _RNG_META.setdefault(q_bshd.device.type, tuple((tuple(t.shape), t.dtype) for t in rng))
        out_thd.index_copy_(0, qi, out)
        lse_ht.index_copy_(1, qi, lse)
    return out_thd.view(q_bshd.shape), lse_ht.view(heads, batch, num_q).transpose(0, 1)


def varlen_backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, seg: Segments, scale: float):
    batch, num_q, heads, dim = q_bshd.shape
    num_k, kv_heads = k_bshd.shape[1], k_bshd.shape[2]
    flat = [t.reshape(-1, t.shape[2], dim) for t in (dout_bshd, q_bshd, out_bshd, k_bshd, v_bshd)]
    do_thd, q_thd, out_thd, k_thd, v_thd = flat
    lse_ht = lse_bhs.float().transpose(0, 1).reshape(heads, batch * num_q)
    dq_thd = torch.zeros(q_thd.shape, dtype=torch.float32, device=q_bshd.device)
    if len(seg) == 1 and kv_heads > 1:
        dk_thd, dv_thd = _one_segment_backward(do_thd, q_thd, k_thd, v_thd, out_thd, lse_ht, dq_thd, seg, num_q,
                                               num_k, scale)
        return dq_thd.view(q_bshd.shape).to(q_bshd.dtype), dk_thd.view(k_bshd.shape), dv_thd.view(v_bshd.shape)
    dk_thd = torch.zeros(batch * num_k, kv_heads, dim, dtype=torch.float32, device=q_bshd.device)
    dv_thd = torch.zeros_like(dk_thd)
    if len(seg) <= SEGMENT_CALLS:
        _segments_backward(do_thd, q_thd, k_thd, v_thd, out_thd, lse_ht, dq_thd, dk_thd, dv_thd, seg, num_q, num_k,
                           scale)
        return (dq_thd.view(q_bshd.shape).to(q_bshd.dtype), dk_thd.view(k_bshd.shape).to(k_bshd.dtype),
                dv_thd.view(v_bshd.shape).to(v_bshd.dtype))
    rng, unused = _rng_state(q_bshd.device)
    for causal, qi, ki, cu_q, cu_k, max_q, max_k in _varlen_groups(seg, q_bshd.device, num_q, num_k):
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do_thd.index_select(0, qi), q_thd.index_select(0, qi), k_thd.index_select(0, ki),
            v_thd.index_select(0, ki), out_thd.index_select(0, qi), lse_ht.index_select(1, qi).contiguous(),
            cu_q, cu_k, max_q, max_k, 0.0, causal, rng, unused, scale=scale)
        dq_thd.index_copy_(0, qi, dq.float())
        dk_thd.index_add_(0, ki, dk.float())  # a key may serve several segments (zigzag runs)
        dv_thd.index_add_(0, ki, dv.float())
    return (dq_thd.view(q_bshd.shape).to(q_bshd.dtype), dk_thd.view(k_bshd.shape).to(k_bshd.dtype),
            dv_thd.view(v_bshd.shape).to(v_bshd.dtype))


def _loop_mask(causal: bool, num_q: int, num_k: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """Additive bottom-right causal mask (None: dense, or square where ``is_causal`` does it)."""
    if not causal or num_q == num_k:
        return None
    keep = torch.ones(num_q, num_k, dtype=torch.bool, device=like.device).tril(num_k - num_q)
    return torch.zeros(num_q, num_k, dtype=like.dtype, device=like.device).masked_fill_(~keep, float("-inf"))


def _loop_slices(seg: Segments):
    for b, q0, q1, k0, k1, causal in zip(*(t.tolist() for t in (seg.row, seg.q0, seg.q1, seg.k0, seg.k1,
                                                                   seg.causal))):
        yield b, slice(q0, q1), slice(k0, k1), causal, causal and q1 - q0 == k1 - k0


def _bhsd(x_bshd: torch.Tensor, b: int, s: slice) -> torch.Tensor:
    return x_bshd[b:b + 1, s].transpose(1, 2)


def loop_forward(q_bshd, k_bshd, v_bshd, seg: Segments, scale: float):
    out_bshd = torch.zeros_like(q_bshd)
    lse_bhs = torch.full((q_bshd.shape[0], q_bshd.shape[2], q_bshd.shape[1]), float("-inf"),
                         dtype=torch.float64 if q_bshd.dtype == torch.float64 else torch.float32, device=q_bshd.device)
    for b, qs, ks, causal, square in _loop_slices(seg):
        q, k, v = _bhsd(q_bshd, b, qs), _bhsd(k_bshd, b, ks), _bhsd(v_bshd, b, ks)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, square, attn_mask=_loop_mask(causal, q.shape[2], k.shape[2], q), scale=scale)
        out_bshd[b:b + 1, qs] = out.transpose(1, 2)
        lse_bhs[b:b + 1, :, qs] = lse
    return out_bshd, lse_bhs


def loop_backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, seg: Segments, scale: float):
    dq_bshd, dk_bshd, dv_bshd = (torch.zeros_like(t) for t in (q_bshd, k_bshd, v_bshd))
    for b, qs, ks, causal, square in _loop_slices(seg):
        q, k, v = _bhsd(q_bshd, b, qs), _bhsd(k_bshd, b, ks), _bhsd(v_bshd, b, ks)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout_bshd, b, qs).contiguous(), q, k, v, _bhsd(out_bshd, b, qs).contiguous(),
            lse_bhs[b:b + 1, :, qs].to(q.dtype).contiguous(), 0.0, square,
            attn_mask=_loop_mask(causal, q.shape[2], k.shape[2], q), scale=scale)
        dq_bshd[b:b + 1, qs] += dq.transpose(1, 2)
        dk_bshd[b:b + 1, ks] += dk.transpose(1, 2)
        dv_bshd[b:b + 1, ks] += dv.transpose(1, 2)
    return dq_bshd, dk_bshd, dv_bshd
