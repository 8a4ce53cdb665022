"""Ring attention: exact causal attention over a sequence sharded across a ring of ranks.

Each rank keeps its queries; the keys and values (with their global token indices and document
ids) travel round the ring, one hop per step, and every visiting block's partial attention is
merged into the running output with the log-sum-exp (online softmax, in fp32). The next block's
send/receive is posted before the current block is computed, so communication overlaps compute.
The backward sends K/V round the ring again; each rank adds its queries' gradient from every
visiting block and the visiting block's dK/dV contribution to an fp32 accumulator that travels
with the block, so that after the last hop every rank holds the full dK/dV of its own tokens
(ring attention, Liu et al. 2023; ring self-attention, Li et al. 2021).

The shard of each rank is any set of tokens given by their global indices; with a causal mask the
zigzag shard (:mod:`longtrain.parallel.sharding`) gives every rank the same work. Blocks in which
no query can see any key are skipped (as with a contiguous shard's later ranks).

Layout legend:
    q_bshd      [batch, local_seq, num_heads, head_dim]     this rank's queries
    k_bshd      [batch, local_seq, num_kv_heads, head_dim]  this rank's keys (and the visiting ones)
    v_bshd      [batch, local_seq, num_kv_heads, head_dim]  values, as keys
    out_bshd    [batch, local_seq, num_heads, head_dim]     attention output of this rank's queries
    lse_bhs     [batch, num_heads, local_seq]               merged log-sum-exp, fp32 (fp64 for fp64)
    seq_idx     [local_seq] int64 global indices of this rank's tokens
    doc_ids_bs  [batch, local_seq] document ids of this rank's tokens, or None
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from longtrain.kernels.blocks import has_visible_keys, merge_partials
from longtrain.kernels.dispatch import DEFAULT_KERNELS, AttentionKernels
from longtrain.parallel.sharding import zigzag_indices


@dataclass
class RingStats:
    """Counters of ring traffic and work on this rank; read and :meth:`reset` by the trainer."""

    fwd_bytes_sent: int = 0
    """Bytes this rank sent in ring forwards (K, V, token indices, document ids)."""
    bwd_bytes_sent: int = 0
    """Bytes this rank sent in ring backwards (K, V and the fp32 dK/dV accumulators)."""
    blocks_computed: int = 0
    """Forward blocks computed."""
    blocks_skipped: int = 0
    """Forward blocks skipped because no query could see any key."""
    wait_s: float = 0.0
    """Seconds spent waiting for hops to complete: the communication not hidden behind compute."""

    def reset(self) -> None:
        """Zero every counter."""
        self.fwd_bytes_sent = self.bwd_bytes_sent = self.blocks_computed = self.blocks_skipped = 0
        self.wait_s = 0.0


RING_STATS = RingStats()
"""Where :func:`ring_attention` counts when no ``stats`` object is passed."""


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Ring:
    """This rank's place in a ring group and one asynchronous hop of a list of tensors."""

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        if not dist.is_initialized():
            self.group, self.rank, self.size = None, 0, 1
            return
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("ring_attention called on a rank outside its ring group")
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def hop(self, tensors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], list]:
        """Post send of ``tensors`` to the next rank and receive of the previous rank's into new buffers."""
        recvs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recvs]
        return recvs, dist.batch_isend_irecv(ops)


def _wait(reqs: list, stats: RingStats) -> None:
    t0 = time.perf_counter()
    for req in reqs:
        req.wait()
    stats.wait_s += time.perf_counter() - t0


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_bshd, k_bshd, v_bshd, doc_ids_bs, seq_idx, scale, group, stats, kernels):
        ring = _Ring(group)
        acc_dtype = torch.float64 if q_bshd.dtype == torch.float64 else torch.float32
        block = [k_bshd.contiguous(), v_bshd.contiguous(), seq_idx.contiguous()]
        if doc_ids_bs is not None:
            block.append(doc_ids_bs.contiguous())
        out_acc, lse_acc = None, None
        visits = []  # (k_idx, k_doc, computed) per step, so the backward needn't send them again
        for step in range(ring.size):
            if step + 1 < ring.size:  # post the next hop first: it overlaps this block's compute
                incoming, reqs = ring.hop(block)
                stats.fwd_bytes_sent += _nbytes(block)
            k_blk, v_blk, idx_blk = block[:3]
            doc_blk = block[3] if doc_ids_bs is not None else None
            computed = has_visible_keys(seq_idx, idx_blk, doc_ids_bs, doc_blk)
            if computed:
                out_i, lse_i = kernels.forward(q_bshd, k_blk, v_blk, seq_idx, idx_blk, doc_ids_bs, doc_blk, scale)
                if out_acc is None:
                    out_acc, lse_acc = out_i.to(acc_dtype), lse_i.to(acc_dtype)
                else:
                    out_acc, lse_acc = merge_partials(out_acc, lse_acc, out_i, lse_i)
                stats.blocks_computed += 1
            else:
                stats.blocks_skipped += 1
            visits.append((idx_blk, doc_blk, computed))
            if step + 1 < ring.size:
                _wait(reqs, stats)
                block = incoming
        if out_acc is None:  # no query of this rank sees any key at all
            out_acc = torch.zeros(q_bshd.shape, dtype=acc_dtype, device=q_bshd.device)
            lse_acc = torch.full((q_bshd.shape[0], q_bshd.shape[2], q_bshd.shape[1]), float("-inf"),
                                 dtype=acc_dtype, device=q_bshd.device)
        out_bshd = out_acc.to(q_bshd.dtype)
        ctx.save_for_backward(q_bshd, k_bshd, v_bshd, out_bshd, lse_acc, seq_idx, doc_ids_bs)
        ctx.visits, ctx.scale, ctx.group, ctx.stats, ctx.kernels = visits, scale, group, stats, kernels
        return out_bshd

    @staticmethod
    def backward(ctx, dout_bshd):
        q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, seq_idx, doc_ids_bs = ctx.saved_tensors
        ring = _Ring(ctx.group)
        acc_dtype = lse_bhs.dtype
        dout_bshd = dout_bshd.contiguous()
        dq_acc = torch.zeros(q_bshd.shape, dtype=acc_dtype, device=q_bshd.device)
        kv_blk = [k_bshd.contiguous(), v_bshd.contiguous()]
        dkv_reqs: list = []
        dkv_incoming: List[torch.Tensor] = []
        for step in range(ring.size):
            if step + 1 < ring.size:
                kv_incoming, kv_reqs = ring.hop(kv_blk)
                ctx.stats.bwd_bytes_sent += _nbytes(kv_blk)
            idx_blk, doc_blk, computed = ctx.visits[step]
            # The accumulator of the block held now arrives from the previous rank, which held
            # this block one step ago; at step 0 the block is our own and starts from zero.
            if step == 0:
                dk_acc = torch.zeros(k_bshd.shape, dtype=acc_dtype, device=k_bshd.device)
                dv_acc = torch.zeros(v_bshd.shape, dtype=acc_dtype, device=v_bshd.device)
            else:
                _wait(dkv_reqs, ctx.stats)
                dk_acc, dv_acc = dkv_incoming
            if computed:
                dq_i, dk_i, dv_i = ctx.kernels.backward(dout_bshd, q_bshd, kv_blk[0], kv_blk[1], out_bshd, lse_bhs,
                                                        seq_idx, idx_blk, doc_ids_bs, doc_blk, ctx.scale)
                dq_acc += dq_i
                dk_acc += dk_i
                dv_acc += dv_i
            if ring.size > 1:  # one hop more than K/V: the last one brings each accumulator home
                dkv_incoming, dkv_reqs = ring.hop([dk_acc, dv_acc])
                ctx.stats.bwd_bytes_sent += _nbytes([dk_acc, dv_acc])
            if step + 1 < ring.size:
                _wait(kv_reqs, ctx.stats)
                kv_blk = kv_incoming
        if ring.size > 1:
            _wait(dkv_reqs, ctx.stats)
            dk_acc, dv_acc = dkv_incoming
        return (dq_acc.to(q_bshd.dtype), dk_acc.to(k_bshd.dtype), dv_acc.to(v_bshd.dtype),
                None, None, None, None, None, None)


def ring_attention(q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                   doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None, *,
                   group: Optional[dist.ProcessGroup], seq_idx: torch.Tensor,
                   stats: Optional[RingStats] = None, kernels: AttentionKernels = DEFAULT_KERNELS) -> torch.Tensor:
    """Exact causal (and document-masked) attention of this rank's tokens over the whole ring's.

    Every rank of ``group`` must call this together with same-shaped tensors. Differentiable:
    the backward is a second ring pass that returns dQ, dK, dV of this rank's tokens.

    Args:
        q_bshd: [B, S_local, Hq, D] this rank's queries.
        k_bshd: [B, S_local, Hkv, D] this rank's keys; Hq must be a multiple of Hkv (GQA).
        v_bshd: [B, S_local, Hkv, D] this rank's values.
        doc_ids: [B, S_local] document ids of this rank's tokens (a token sees only keys of equal
            id), or None for one document per row; must be None on every rank or on none.
        scale: softmax scale; None means ``1 / sqrt(D)``.
        group: the ring process group (None: the default group). Without an initialised process
            group the ring has one rank and this is plain local attention.
        seq_idx: [S_local] int64 global indices of this rank's tokens in the full sequence, e.g.
            :func:`~longtrain.parallel.sharding.zigzag_indices`.
        stats: counters to add traffic to; None means the module's :data:`RING_STATS`.
        kernels: the attention kernels every block runs on.

    Returns:
        out_bshd: [B, S_local, Hq, D] in q's dtype.

    Raises:
        ValueError: inconsistent shapes.
    """
    batch, local_seq, num_heads, head_dim = q_bshd.shape
    if k_bshd.shape != v_bshd.shape or k_bshd.shape[:2] != (batch, local_seq) or k_bshd.shape[3] != head_dim:
        raise ValueError(f"q/k/v shapes disagree: {tuple(q_bshd.shape)}, {tuple(k_bshd.shape)}, "
                         f"{tuple(v_bshd.shape)}")
    if num_heads % k_bshd.shape[2]:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({k_bshd.shape[2]})")
    if seq_idx.shape != (local_seq,):
        raise ValueError(f"seq_idx must be [S_local]=[{local_seq}], got {tuple(seq_idx.shape)}")
    if doc_ids is not None and doc_ids.shape != (batch, local_seq):
        raise ValueError(f"doc_ids must be [B, S_local]=[{batch}, {local_seq}], got {tuple(doc_ids.shape)}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    seq_idx = seq_idx.to(device=q_bshd.device, dtype=torch.long)
    return _RingAttention.apply(q_bshd, k_bshd, v_bshd, doc_ids, seq_idx, scale, group,
                                RING_STATS if stats is None else stats, kernels)


def zigzag_ring_attention(q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                          doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None, *,
                          group: Optional[dist.ProcessGroup], seq_len: int,
                          stats: Optional[RingStats] = None, kernels: AttentionKernels = DEFAULT_KERNELS
                          ) -> torch.Tensor:
    """:func:`ring_attention` for inputs sharded by :func:`~longtrain.parallel.sharding.zigzag_shard`.

    Args:
        q_bshd, k_bshd, v_bshd, doc_ids, scale, group, stats, kernels: as :func:`ring_attention`.
        seq_len: the full sequence length; this rank holds ``seq_len / ring_size`` tokens.

    Returns:
        out_bshd: [B, S_local, Hq, D] in q's dtype.

    Raises:
        ValueError: ``seq_len`` not divisible by ``2 * ring_size``, or the local length is not
            ``seq_len / ring_size``.
    """
    ring = _Ring(group)
    seq_idx = zigzag_indices(seq_len, ring.size, ring.rank)
    if q_bshd.shape[1] != seq_idx.numel():
        raise ValueError(f"local sequence length {q_bshd.shape[1]} != data.seq_len / parallel.sp.ring = "
                         f"{seq_len} / {ring.size}")
    return ring_attention(q_bshd, k_bshd, v_bshd, doc_ids, scale, group=group, seq_idx=seq_idx, stats=stats,
                          kernels=kernels)


class RingAttention:
    """:func:`zigzag_ring_attention` over ``group`` as an attention function
    (``fn(q_bshd, k_bshd, v_bshd, doc_ids=None, scale=None) -> out_bshd``). This rank's rows are
    taken as zigzag shards of a sequence ``ring`` times their length, whatever that length is
    (the training length, evaluation beyond it, a planner's short warm-up step); a length the
    zigzag cut cannot take (not a multiple of ``2 * ring``) is refused.

    It does not stream by key prefix (:mod:`longtrain.kernels.attention`): a chunk's keys live on
    every rank of the ring, so StreamBP runs this attention core whole (one ring pass forward and
    one backward, as under checkpointing) and streams the rest of the layer
    (:mod:`longtrain.memory.two_pass`).
    """

    can_stream = False

    def __init__(self, group: Optional[dist.ProcessGroup], stats: Optional[RingStats] = None,
                 kernels: AttentionKernels = DEFAULT_KERNELS):
        self.group, self.stats, self.kernels = group, stats, kernels

    def __repr__(self) -> str:
        return f"RingAttention(ring={_Ring(self.group).size})"

    def __call__(self, q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                 doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
        return zigzag_ring_attention(q_bshd, k_bshd, v_bshd, doc_ids, scale, group=self.group,
                                     seq_len=q_bshd.shape[1] * _Ring(self.group).size, stats=self.stats,
                                     kernels=self.kernels)

    def chunk_keys(self, k_bshd: torch.Tensor, v_bshd: torch.Tensor, doc_ids: Optional[torch.Tensor],
                   scale: float, num_heads: int) -> None:
        """None: ring attention cannot stream (class docstring)."""
        return None
