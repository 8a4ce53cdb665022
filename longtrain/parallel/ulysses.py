"""Ulysses sequence-parallel attention: an all-to-all trades a sequence slice for a head slice.

Each of the ``U`` ranks of the Ulysses ``group`` holds a contiguous ``1/U`` slice of the sequence
(group rank ``u`` holds tokens ``[u*S/U, (u+1)*S/U)``) of every head. An all-to-all turns that into
the whole (Ulysses-level) sequence of ``H/U`` heads, any attention function with the contract of
:func:`~longtrain.kernels.attention.local_attention` runs on it (the local kernel, or ring
attention in the hybrid layout, where "the whole sequence" is the ring rank's share), and a second
all-to-all turns the output back (DeepSpeed-Ulysses, 2023, section 3).

Grouped-query attention: rank ``u`` receives query heads ``[u*Hq/U, (u+1)*Hq/U)`` and must receive
exactly the KV heads they read (query head ``h`` reads KV head ``h // (Hq/Hkv)``). Each KV head is
replicated ``r = U / gcd(Hkv, U)`` times (``repeat_interleave``, so autograd sums the replicas'
gradients back): ``r = 1`` when ``Hkv % U == 0``, ``r = U / Hkv`` when ``U % Hkv == 0``, and the
smallest replication that splits evenly otherwise. The only requirement is ``Hq % U == 0``.

Communication (:mod:`longtrain.parallel.all_to_all`): every all-to-all is one
``dist.all_to_all_single`` on a packed contiguous buffer (gloo implements it on CPU, as NCCL does
on GPU, so no list-based ``dist.all_to_all`` fallback is needed). Q, K and V travel in one buffer, so the forward issues one collective for the inputs and
one for the output, and the backward mirrors that (each all-to-all's backward is the inverse
all-to-all, so dQ, dK and dV also travel together). Tensors of different dtypes cannot share a
buffer; they go as one ``async_op=True`` all-to-all each, all in flight at once, waited for before
attention.

Overlap (``chunks`` > 1, :class:`_PipelinedUlysses`): attention is independent per head, so the
heads are cut into C chunks and pipelined. Every chunk's q/k/v all-to-all is posted at once; chunk
c's attention runs while chunk c+1's inputs and chunk c-1's output are in flight. The backward
posts every output-gradient all-to-all, then sends chunk c's dQ/dK/dV while chunk c+1's attention
backward runs. The bytes are the same as with one chunk; the collectives are C times more and C
times smaller, so C of 2 to 4 is the useful range.

Layout legend (``s = S/U`` local tokens, ``h = H/U`` heads per rank, ``r`` KV replication):
    q_bshd        [B, s, Hq, D]      local sequence slice of every query head (input)
    k_bshd/v_bshd [B, s, Hkv, D]     local slice of every KV head (input)
    k_rep_bshd    [B, s, Hkv*r, D]   KV heads replicated so they split evenly over U
    q_bShd        [B, S, Hq/U, D]    whole Ulysses-level sequence of this rank's query heads
    k_bShd        [B, S, Hkv*r/U, D] whole sequence of this rank's KV heads
    out_bShd      [B, S, Hq/U, D]    inner attention output
    out_bshd      [B, s, Hq, D]      output, back in the input layout
    doc_ids_bs    [B, s]             local document ids; doc_ids_bS [B, S] gathered
    send_uX       [U, X]             packed all-to-all buffer; row j goes to group rank j
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from longtrain.kernels.attention import ChunkKeys, LocalAttention, local_attention
from longtrain.models.args import divisors
from longtrain.parallel.all_to_all import (HEAD_DIM, SEQ_DIM, ULYSSES_STATS, UlyssesStats, _AllToAll,
                                           all_gather_seq, all_to_all_heads_to_seq, all_to_all_seq_to_heads,
                                           collect, exchange, group_size, post)

AttentionFn = Callable[..., torch.Tensor]



def validate_ulysses(num_heads: int, num_kv_heads: int, degree: int) -> int:
    """Check that ``degree`` Ulysses ranks can split the heads; return the KV replication factor.

    Args:
        num_heads: query heads Hq of the model.
        num_kv_heads: key/value heads Hkv (Hq must be a multiple of it).
        degree: Ulysses degree U.

    Returns:
        r: how many times each KV head is replicated (``U / gcd(Hkv, U)``) so that ``Hkv * r``
        heads split evenly over U ranks and rank ``u`` gets exactly the KV heads its queries read.

    Raises:
        ValueError: ``degree < 1``, Hq not a multiple of Hkv, or U not dividing Hq (the message
            names the valid degrees and the hybrid layout as the way to use the rest of the degree).
    """
    if degree < 1:
        raise ValueError(f"parallel.sp.ulysses must be at least 1, got {degree}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"model.num_heads={num_heads} must be a positive multiple of model.num_kv_heads="
                         f"{num_kv_heads}; fix the model config")
    if num_heads % degree:
        raise ValueError(
            f"parallel.sp.ulysses={degree} does not divide model.num_heads={num_heads}; choose a ulysses "
            f"degree in {divisors(num_heads)} or use parallel.sp.ring for the rest of the degree (hybrid layout)")
    rep = degree // math.gcd(num_kv_heads, degree)
    # Internal invariant: local query head i of rank u must read local KV head i // (group size)
    # and that must be the KV head HF's repeat_kv order assigns to global query head u*Hq/U + i.
    q_per_rank, kv_per_rank = num_heads // degree, num_kv_heads * rep // degree
    group_size, local_group = num_heads // num_kv_heads, q_per_rank // kv_per_rank
    assert q_per_rank % kv_per_rank == 0
    for u in range(degree):
        for i in range(q_per_rank):
            assert (u * kv_per_rank + i // local_group) // rep == (u * q_per_rank + i) // group_size
    return rep


def _head_chunks(x_bshd: torch.Tensor, degree: int, chunks: int) -> List[torch.Tensor]:
    """Cut each rank's head slice into ``chunks`` parts: chunk c holds heads ``[c*h/C, (c+1)*h/C)``
    of every rank's slice, so its all-to-all delivers that sub-slice to every rank."""
    x_bsuchd = x_bshd.unflatten(HEAD_DIM, (degree, chunks, -1))
    return [x_bsuchd[:, :, :, c].flatten(2, 3) for c in range(chunks)]


def _join_head_chunks(parts: Sequence[torch.Tensor], degree: int) -> torch.Tensor:
    """Inverse of :func:`_head_chunks`."""
    return torch.stack([p.unflatten(HEAD_DIM, (degree, -1)) for p in parts], dim=3).flatten(2, 4)


def _forget(attention) -> Callable[[weakref.ref], None]:
    """The callback that drops ``attention``'s cached gathered document ids once the tensor they
    were gathered from dies (holds ``attention`` weakly)."""
    owner = weakref.ref(attention)

    def drop(ref: weakref.ref) -> None:
        me = owner()
        if me is not None and me._doc_cache is not None and me._doc_cache[0] is ref:
            me._doc_cache = None

    return drop


class _PipelinedUlysses(torch.autograd.Function):
    """Ulysses attention with the heads in C chunks whose all-to-alls overlap the other chunks' work.

    Forward: every chunk's q/k/v all-to-all is posted first; then chunk c is waited for, its inner
    attention runs (recording its own autograd graph) and its output all-to-all is posted while
    chunk c+1 computes. Backward mirrors it: the output-gradient all-to-alls are posted first, and
    chunk c's dQ/dK/dV all-to-all travels while chunk c+1's attention backward runs. With NCCL the
    collectives run on their own stream, so a wait only orders the compute stream after them and
    the transfers hide behind attention; with gloo they run on gloo's threads.
    """

    @staticmethod
    def forward(ctx, attn, chunks, doc_ids_bS, scale, q_bshd, k_bshd, v_bshd):
        group, stats, degree = attn.group, attn.stats, attn.degree
        posted = [post(parts, group, HEAD_DIM, SEQ_DIM, stats)
                  for parts in zip(*(_head_chunks(t, degree, chunks) for t in (q_bshd, k_bshd, v_bshd)))]
        leaves, outs, out_posted = [], [], []
        for pending in posted:
            qkv = [t.detach().requires_grad_() for t in collect(pending, stats)]
            with torch.enable_grad():
                out_bShd = attn.inner(*qkv, doc_ids=doc_ids_bS, scale=scale)
            leaves.append(qkv)
            outs.append(out_bShd)
            out_posted.append(post([out_bShd.detach()], group, SEQ_DIM, HEAD_DIM, stats))
        out_bshd = _join_head_chunks([collect(pending, stats)[0] for pending in out_posted], degree)
        ctx.attn, ctx.chunks, ctx.graphs = attn, chunks, (leaves, outs)
        return out_bshd

    @staticmethod
    def backward(ctx, dout_bshd):
        attn, (leaves, outs) = ctx.attn, ctx.graphs
        group, stats, degree = attn.group, attn.stats, attn.degree
        posted = [post([d], group, HEAD_DIM, SEQ_DIM, stats, backward=True)
                  for d in _head_chunks(dout_bshd, degree, ctx.chunks)]
        grads_posted = []
        for pending, qkv, out_bShd in zip(posted, leaves, outs):
            grads = torch.autograd.grad(out_bShd, qkv, collect(pending, stats)[0])
            grads_posted.append(post(grads, group, SEQ_DIM, HEAD_DIM, stats, backward=True))
        ctx.graphs = None
        grads = zip(*(collect(pending, stats) for pending in grads_posted))
        return (None, None, None, None, *(_join_head_chunks(parts, degree) for parts in grads))


# ---------------------------------------------------------------------------- the attention wrapper
class UlyssesAttention:
    """Attention function that runs ``inner`` on the whole sequence of a slice of heads.

    Called like :func:`~longtrain.kernels.attention.local_attention`, on the local sequence slice:
    ``fn(q_bshd, k_bshd, v_bshd, doc_ids=None, scale=None) -> out_bshd``.

    Args:
        group: the Ulysses process group (None: the default group); its size is the degree U.
        inner: attention function with the same signature, run on ``[B, S, H/U, D]``; it may itself
            be distributed (ring attention in the hybrid layout), so nothing assumes it is local.
        num_heads: optional Hq, to validate the layout at construction instead of at first call.
        num_kv_heads: optional Hkv (default: ``num_heads``).
        stats: counters to add the bytes sent to (None: :data:`ULYSSES_STATS`, shared by every
            instance); exposed as ``self.stats``.
        chunks: head chunks to pipeline (1: one all-to-all each way for all heads). With C > 1 each
            chunk's all-to-alls overlap the other chunks' attention, forward and backward; C is
            lowered to the largest divisor of the KV heads per rank that does not exceed it.

    Raises:
        ValueError: from :func:`validate_ulysses` when the heads do not split over U.

    Streaming (:meth:`chunk_keys`): with local attention inside, a StreamBP chunk's keys are this
    rank's heads of the whole sequence (:class:`_UlyssesChunkKeys`); with ring attention inside
    they live on other ring ranks and it does not stream.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, inner: AttentionFn = local_attention,
                 num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 stats: Optional[UlyssesStats] = None, chunks: int = 1):
        if chunks < 1:
            raise ValueError(f"parallel.sp.ulysses_chunks must be at least 1, got {chunks}")
        self.group = group
        self.inner = inner
        self.chunks = chunks
        self.degree = group_size(group)
        self.stats = stats if stats is not None else ULYSSES_STATS
        self._replication: Dict[Tuple[int, int], int] = {}
        self._doc_cache: Optional[Tuple[weakref.ref, int, torch.Tensor]] = None
        if num_heads is not None:
            self._kv_replication(num_heads, num_kv_heads or num_heads)

    def __repr__(self) -> str:
        inner = getattr(self.inner, "__name__", type(self.inner).__name__)
        return f"UlyssesAttention(degree={self.degree}, chunks={self.chunks}, inner={inner})"

    @property
    def can_stream(self) -> bool:
        """Whether :meth:`chunk_keys` returns a strategy (local attention inside), without tensors."""
        return isinstance(self.inner, LocalAttention)

    def chunk_keys(self, k_bshd: torch.Tensor, v_bshd: torch.Tensor, doc_ids: Optional[torch.Tensor],
                   scale: float, num_heads: int) -> Optional[ChunkKeys]:
        """How a StreamBP query chunk gets its keys (:mod:`longtrain.kernels.attention`).

        Args:
            k_bshd, v_bshd: [B, s, Hkv, D] this rank's K (after RoPE) and V of its local slice.
            doc_ids: [B, s] local document ids, or None.
            scale: softmax scale.
            num_heads: Hq of the layer (for the KV replication).

        Returns:
            None when ``inner`` is not local attention (ring, hybrid); the local strategy at degree
            1; else a :class:`_UlyssesChunkKeys`, whose construction runs the K/V all-to-all (every
            rank of the group must call it together, as it calls the attention).
        """
        if not self.can_stream:
            return None
        if self.degree == 1:
            return self.inner.chunk_keys(k_bshd, v_bshd, doc_ids, scale, num_heads)
        return _UlyssesChunkKeys(self, k_bshd, v_bshd, doc_ids, scale, num_heads)

    def effective_chunks(self, num_kv_heads: int, rep: int) -> int:
        """Head chunks used for a model with ``num_kv_heads`` KV heads replicated ``rep`` times."""
        kv_per_rank = num_kv_heads * rep // self.degree
        return max(c for c in range(1, min(self.chunks, kv_per_rank) + 1) if kv_per_rank % c == 0)

    def _kv_replication(self, num_heads: int, num_kv_heads: int) -> int:
        key = (num_heads, num_kv_heads)
        if key not in self._replication:
            self._replication[key] = validate_ulysses(num_heads, num_kv_heads, self.degree)
        return self._replication[key]

    @staticmethod
    def _replicate_kv(kv_bshd: torch.Tensor, rep: int) -> torch.Tensor:
        # Interleaved (k0 k0 k1 k1 ...), HF's repeat_kv order: consecutive query heads share a KV head,
        # so rank u's contiguous block of replicas is the KV head its contiguous query heads read.
        return kv_bshd.repeat_interleave(rep, dim=HEAD_DIM) if rep > 1 else kv_bshd

    def _gather_doc_ids(self, doc_ids_bs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Document ids of the whole Ulysses-level sequence, cached for the same tensor object.

        Every layer of one forward passes the same ``doc_ids`` object, so layers after the first
        reuse the gathered copy. A hit needs the very object (weak reference still alive) at the
        same in-place version; every rank runs the same program, so all ranks hit or miss together
        and the all-gather stays matched across the group. Inference-mode tensors carry no version
        counter and are never cached. The gathered copy is dropped when ``doc_ids`` dies, so it does
        not outlive its batch (8 bytes per token of the Ulysses-level sequence, held between steps).
        """
        if doc_ids_bs is None:
            return None
        cacheable = not doc_ids_bs.is_inference()
        cache = self._doc_cache
        if cacheable and cache is not None and cache[0]() is doc_ids_bs and cache[1] == doc_ids_bs._version:
            return cache[2]
        doc_ids_bS = all_gather_seq(doc_ids_bs, self.group, self.stats)
        self._doc_cache = ((weakref.ref(doc_ids_bs, _forget(self)), doc_ids_bs._version, doc_ids_bS)
                           if cacheable else None)
        return doc_ids_bS

    def __call__(self, q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                 doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
        """Attention of the local query slice over the whole Ulysses-level sequence.

        Args:
            q_bshd: [B, S/U, Hq, D] local queries (every head).
            k_bshd: [B, S/U, Hkv, D] local keys.
            v_bshd: [B, S/U, Hkv, D] local values.
            doc_ids: optional [B, S/U] local document ids (gathered over the group for ``inner``).
            scale: softmax scale passed to ``inner`` (None: ``1/sqrt(D)``).

        Returns:
            out_bshd: [B, S/U, Hq, D].

        Raises:
            ValueError: the heads do not split over U, or q/k/v/doc_ids shapes disagree.
        """
        if self.degree == 1:
            return self.inner(q_bshd, k_bshd, v_bshd, doc_ids=doc_ids, scale=scale)
        if k_bshd.shape != v_bshd.shape or k_bshd.dim() != 4 or q_bshd.dim() != 4 \
                or k_bshd.shape[:2] != q_bshd.shape[:2] or k_bshd.shape[3] != q_bshd.shape[3]:
            raise ValueError(f"Ulysses attention needs q [B, s, Hq, D] and k, v [B, s, Hkv, D]; got q "
                             f"{tuple(q_bshd.shape)}, k {tuple(k_bshd.shape)}, v {tuple(v_bshd.shape)}")
        if doc_ids is not None and tuple(doc_ids.shape) != tuple(q_bshd.shape[:2]):
            raise ValueError(f"doc_ids must be [B, s] = {tuple(q_bshd.shape[:2])}, got {tuple(doc_ids.shape)}")
        rep = self._kv_replication(q_bshd.shape[HEAD_DIM], k_bshd.shape[HEAD_DIM])
        k_rep_bshd, v_rep_bshd = self._replicate_kv(k_bshd, rep), self._replicate_kv(v_bshd, rep)
        chunks = self.effective_chunks(k_bshd.shape[HEAD_DIM], rep)
        if chunks > 1:
            return _PipelinedUlysses.apply(self, chunks, self._gather_doc_ids(doc_ids), scale,
                                           q_bshd, k_rep_bshd, v_rep_bshd)
        q_bShd, k_bShd, v_bShd = _AllToAll.apply(self.group, HEAD_DIM, SEQ_DIM, self.stats,
                                                 q_bshd, k_rep_bshd, v_rep_bshd)
        out_bShd = self.inner(q_bShd, k_bShd, v_bShd, doc_ids=self._gather_doc_ids(doc_ids), scale=scale)
        return all_to_all_heads_to_seq(out_bShd, self.group, self.stats)


class _UlyssesChunkKeys(ChunkKeys):
    """StreamBP keys under Ulysses: this rank's heads of the whole Ulysses-level sequence.

    The chunk ``[start, end)`` of every rank's local slice is one step: its queries go through the
    all-to-all (rank u's chunk holds global tokens ``u*s + [start, end)``), attend to the key prefix
    after the all-to-all, and come back; dK/dV of the whole sequence return with one all-to-all at
    the end and the KV replicas are summed.
    """

    def __init__(self, attn: UlyssesAttention, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                 doc_ids: Optional[torch.Tensor], scale: float, num_heads: int) -> None:
        self.attn, self.local_seq, self.num_kv = attn, k_bshd.shape[SEQ_DIM], k_bshd.shape[HEAD_DIM]
        self.rep = attn._kv_replication(num_heads, self.num_kv)
        k_bShd, v_bShd = exchange([attn._replicate_kv(k_bshd, self.rep), attn._replicate_kv(v_bshd, self.rep)],
                                   attn.group, HEAD_DIM, SEQ_DIM, attn.stats)
        super().__init__(k_bShd, v_bShd, attn._gather_doc_ids(doc_ids), scale, attn.inner.kernels)

    def key_end(self, start: int, end: int) -> int:
        return (self.attn.degree - 1) * self.local_seq + end

    def attend(self, q_bchd, start: int, end: int, k_prefix, v_prefix):
        attn = self.attn
        q_bChd = all_to_all_seq_to_heads(q_bchd, attn.group, attn.stats)
        q_idx = torch.cat([torch.arange(u * self.local_seq + start, u * self.local_seq + end)
                           for u in range(attn.degree)]).to(q_bchd.device)
        k_idx = torch.arange(0, k_prefix.shape[1], device=q_bchd.device)
        q_doc, k_doc = (None, None) if self.doc_ids is None else (self.doc_ids[:, q_idx],
                                                                  self.doc_ids[:, :k_prefix.shape[1]])
        out_bChd = self.kernels.attention(q_bChd, k_prefix, v_prefix, q_idx, k_idx, q_doc, k_doc, self.scale)
        return all_to_all_heads_to_seq(out_bChd, attn.group, attn.stats)

    def local_grads(self, dk_bShd, dv_bShd):
        attn = self.attn
        dk_bshd, dv_bshd = exchange([dk_bShd, dv_bShd], attn.group, SEQ_DIM, HEAD_DIM, attn.stats, backward=True)
        # Replicas are consecutive (repeat_interleave): head h's copies are h*rep .. h*rep+rep-1.
        return tuple(t.unflatten(HEAD_DIM, (self.num_kv, self.rep)).sum(HEAD_DIM + 1) for t in (dk_bshd, dv_bshd))
