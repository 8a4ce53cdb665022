"""Local (single-device) causal attention with grouped-query heads and packed-document masking,
and the streaming contract every attention function answers.

Every attention layer of :class:`~longtrain.models.Transformer` calls one function with the
signature of :data:`local_attention`; sequence-parallel variants (Ulysses, ring) wrap or replace it
with the same contract.

Streaming contract. StreamBP (:mod:`longtrain.memory.streambp`) recomputes a layer's forward one
chunk of queries at a time and needs to know how such a chunk gets its keys. It asks the attention
function, never its type: ``attn_fn.chunk_keys(k_bshd, v_bshd, doc_ids, scale, num_heads)`` takes
this rank's K/V after RoPE and returns a :class:`ChunkKeys` (the whole-sequence K/V the chunks
read, and how a chunk attends to them), or None when attention cannot stream there (its keys live
on other ranks: ring and hybrid layouts) and is recomputed whole. ``attn_fn.can_stream`` says,
without tensors or communication, whether ``chunk_keys`` returns a strategy; a function with
neither member (a plain function) counts as one that cannot stream.

Layout legend:
    q_bshd      [batch, seq, num_heads, head_dim]     queries after RoPE (and q-norm)
    k_bshd      [batch, seq, num_kv_heads, head_dim]  keys after RoPE (and k-norm)
    v_bshd      [batch, seq, num_kv_heads, head_dim]  values
    *_bhsd      the same tensors transposed for torch SDPA
    q_bchd      [batch, chunk, num_heads, head_dim]   queries of one streamed chunk
    out_bshd    [batch, seq, num_heads, head_dim]     attention output
    doc_ids_bs  [batch, seq] integer document id of each token; documents are contiguous runs

Kernels. A :class:`LocalAttention` and the :class:`ChunkKeys` it makes run every block through the
:class:`~longtrain.kernels.dispatch.AttentionKernels` they were built with (the run's one backend
choice). Documents are handled without an S x S mask: on CUDA (half precision) the whole sequence
is one block there (every document in one varlen flash-attention call; a single document may run
on cuDNN); elsewhere each contiguous run of equal ``doc_ids`` is one causal SDPA call. Both are
exact.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from longtrain.kernels.dispatch import DEFAULT_KERNELS, AttentionKernels

_TORCH_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def document_segments(doc_ids_row: torch.Tensor) -> List[Tuple[int, int]]:
    """Contiguous runs of equal document id in one row.

    Args:
        doc_ids_row: [seq] integer tensor.

    Returns:
        ``[(start, end), ...]`` half-open ranges covering ``0..seq`` in order.
    """
    if doc_ids_row.dim() != 1:
        raise ValueError(f"doc_ids_row must be 1-D [seq], got shape {tuple(doc_ids_row.shape)}")
    seq_len = doc_ids_row.shape[0]
    if seq_len == 0:
        return []
    starts = (torch.nonzero(doc_ids_row[1:] != doc_ids_row[:-1]).flatten() + 1).tolist()
    bounds = [0] + starts + [seq_len]
    return list(zip(bounds[:-1], bounds[1:]))


def _causal_sdpa(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                 scale: Optional[float]) -> torch.Tensor:
    groups = q_bhsd.shape[1] // k_bhsd.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, is_causal=True, scale=scale)
    # Native GQA avoids materialising repeated K/V, but on CUDA only the flash kernel (half
    # precision) takes it; elsewhere repeating keeps SDPA off the S x S math fallback.
    native = _TORCH_HAS_GQA and (not q_bhsd.is_cuda or q_bhsd.dtype in (torch.float16, torch.bfloat16))
    if native:
        return F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, is_causal=True, scale=scale, enable_gqa=True)
    k_bhsd = k_bhsd.repeat_interleave(groups, dim=1)
    v_bhsd = v_bhsd.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, is_causal=True, scale=scale)


class ChunkKeys:
    """How the query chunks of a streamed layer get their keys (module docstring).

    Attributes:
        k_bshd: [B, S_keys, Hkv', D] the whole-sequence keys (after RoPE) the chunks read; the
            caller may set it (and ``v_bshd``) to None once the chunks are done, to free them.
        v_bshd: the matching values.
        kernels: the attention kernels every chunk runs on.

    A chunk is the tokens ``[start, end)`` of this rank's sequence; its queries are computed by the
    caller. The base class is the local strategy: keys are this rank's own, no communication.
    """

    def __init__(self, k_bshd: torch.Tensor, v_bshd: torch.Tensor, doc_ids: Optional[torch.Tensor],
                 scale: float, kernels: AttentionKernels = DEFAULT_KERNELS) -> None:
        self.k_bshd, self.v_bshd = k_bshd, v_bshd
        self.doc_ids, self.scale, self.kernels = doc_ids, scale, kernels

    def key_end(self, start: int, end: int) -> int:
        """Keys ``[0, key_end)`` of :attr:`k_bshd` that chunk ``[start, end)`` may see (causality)."""
        return end

    def attend(self, q_bchd: torch.Tensor, start: int, end: int, k_prefix: torch.Tensor,
               v_prefix: torch.Tensor) -> torch.Tensor:
        """Attention of the chunk's queries ``q_bchd`` [B, end - start, Hq, D] over the key prefix
        ``k_prefix``/``v_prefix`` (``[:, :key_end(start, end)]`` of :attr:`k_bshd`/:attr:`v_bshd`),
        differentiable in all three; returns [B, end - start, Hq, D]."""
        q_idx = torch.arange(start, end, device=q_bchd.device)
        k_idx = torch.arange(0, end, device=q_bchd.device)
        q_doc, k_doc = (None, None) if self.doc_ids is None else (self.doc_ids[:, start:end], self.doc_ids[:, :end])
        return self.kernels.attention(q_bchd, k_prefix, v_prefix, q_idx, k_idx, q_doc, k_doc, self.scale)

    def local_grads(self, dk_bshd: torch.Tensor, dv_bshd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """dK/dV of this rank's own K/V (the ``chunk_keys`` inputs) from those of :attr:`k_bshd`."""
        return dk_bshd, dv_bshd


def _local_attention(q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                     doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     kernels: AttentionKernels = DEFAULT_KERNELS) -> torch.Tensor:
    """Causal attention of ``q`` over ``k``/``v`` of the same tokens, never across documents.

    Args:
        q_bshd: [B, S, Hq, D] queries.
        k_bshd: [B, S, Hkv, D] keys; Hq must be a multiple of Hkv (grouped-query attention, query
            head ``h`` reads key/value head ``h // (Hq // Hkv)``).
        v_bshd: [B, S, Hkv, D] values.
        doc_ids: optional [B, S] integer document ids; a token attends only to earlier tokens of
            its own contiguous document. None means one document per row.
        scale: softmax scale; None means ``1 / sqrt(D)``.
        kernels: where the whole sequence runs as one block on CUDA's executors.

    Returns:
        out_bshd: [B, S, Hq, D], dtype of ``q_bshd``.
    """
    batch, seq_len, num_heads, _ = q_bshd.shape
    assert k_bshd.shape[:2] == (batch, seq_len) and num_heads % k_bshd.shape[2] == 0, "q/k/v shapes disagree"
    if doc_ids is not None:
        assert doc_ids.shape == (batch, seq_len), f"doc_ids must be [B, S], got {tuple(doc_ids.shape)}"
        if bool((doc_ids == doc_ids[:, :1]).all()):
            doc_ids = None  # one document per row: a plain causal block
    fused_out = kernels.whole_sequence(q_bshd, k_bshd, v_bshd, doc_ids, scale)
    if fused_out is not None:  # CUDA: the kernels' backend choice, every document in one call
        return fused_out
    q_bhsd, k_bhsd, v_bhsd = (t.transpose(1, 2) for t in (q_bshd, k_bshd, v_bshd))
    if doc_ids is None:
        return _causal_sdpa(q_bhsd, k_bhsd, v_bhsd, scale).transpose(1, 2)
    rows = []
    for b in range(batch):
        pieces = [_causal_sdpa(q_bhsd[b:b + 1, :, s:e], k_bhsd[b:b + 1, :, s:e], v_bhsd[b:b + 1, :, s:e], scale)
                  for s, e in document_segments(doc_ids[b])]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0).transpose(1, 2)


class LocalAttention:
    """Causal attention over this device's whole sequence on ``kernels``; :data:`local_attention` is
    the instance every layer uses until the builder sets the run's own. Called as
    :func:`_local_attention`; streams with the local :class:`ChunkKeys`."""

    __name__ = "local_attention"  # what code naming attention functions printed when it was a function
    can_stream = True  # chunk_keys always returns a strategy

    def __init__(self, kernels: AttentionKernels = DEFAULT_KERNELS) -> None:
        self.kernels = kernels

    def __call__(self, q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                 doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
        return _local_attention(q_bshd, k_bshd, v_bshd, doc_ids=doc_ids, scale=scale, kernels=self.kernels)

    __call__.__doc__ = _local_attention.__doc__

    def __repr__(self) -> str:
        return "local_attention" if self.kernels is DEFAULT_KERNELS else f"local_attention({self.kernels!r})"

    def chunk_keys(self, k_bshd: torch.Tensor, v_bshd: torch.Tensor, doc_ids: Optional[torch.Tensor],
                   scale: float, num_heads: int) -> Optional[ChunkKeys]:
        """The streaming strategy for this rank's K/V [B, S, Hkv, D] after RoPE (module docstring):
        the local :class:`ChunkKeys`, every key on this device. ``num_heads`` (Hq) is unused here."""
        return ChunkKeys(k_bshd, v_bshd, doc_ids, scale, self.kernels)


local_attention = LocalAttention()
"""The local attention function: ``local_attention(q_bshd, k_bshd, v_bshd, doc_ids=None, scale=None)``."""
