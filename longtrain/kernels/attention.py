"""Local (single-device) causal attention with grouped-query heads and packed-document masking.

Every attention layer of :class:`~longtrain.models.Transformer` calls one function with the
signature of :func:`local_attention`; sequence-parallel variants (Ulysses, ring) wrap or replace it
with the same contract.

Layout legend:
    q_bshd      [batch, seq, num_heads, head_dim]     queries after RoPE (and q-norm)
    k_bshd      [batch, seq, num_kv_heads, head_dim]  keys after RoPE (and k-norm)
    v_bshd      [batch, seq, num_kv_heads, head_dim]  values
    *_bhsd      the same tensors transposed for torch SDPA
    out_bshd    [batch, seq, num_heads, head_dim]     attention output
    doc_ids_bs  [batch, seq] integer document id of each token; documents are contiguous runs

Documents are handled without an S x S mask: on CUDA (half precision) all documents go into one
varlen flash-attention call (:func:`~longtrain.kernels.fused.fused_local_attention`);
elsewhere each contiguous run of equal ``doc_ids`` is one causal SDPA call. Both are exact.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

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


def local_attention(q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                    doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of ``q`` over ``k``/``v`` of the same tokens, never across documents.

    Args:
        q_bshd: [B, S, Hq, D] queries.
        k_bshd: [B, S, Hkv, D] keys; Hq must be a multiple of Hkv (grouped-query attention, query
            head ``h`` reads key/value head ``h // (Hq // Hkv)``).
        v_bshd: [B, S, Hkv, D] values.
        doc_ids: optional [B, S] integer document ids; a token attends only to earlier tokens of
            its own contiguous document. None means one document per row.
        scale: softmax scale; None means ``1 / sqrt(D)``.

    Returns:
        out_bshd: [B, S, Hq, D], dtype of ``q_bshd``.
    """
    batch, seq_len, num_heads, _ = q_bshd.shape
    assert k_bshd.shape[:2] == (batch, seq_len) and num_heads % k_bshd.shape[2] == 0, "q/k/v shapes disagree"
    q_bhsd, k_bhsd, v_bhsd = (t.transpose(1, 2) for t in (q_bshd, k_bshd, v_bshd))
    if doc_ids is None or bool((doc_ids == doc_ids[:, :1]).all()):
        return _causal_sdpa(q_bhsd, k_bhsd, v_bhsd, scale).transpose(1, 2)
    assert doc_ids.shape == (batch, seq_len), f"doc_ids must be [B, S], got {tuple(doc_ids.shape)}"
    if q_bshd.is_cuda:
        from longtrain.kernels.fused import fused_local_attention, fused_supported
        if fused_supported(q_bshd):  # every document of every row in one varlen flash call
            return fused_local_attention(q_bshd, k_bshd, v_bshd, doc_ids, scale)
    rows = []
    for b in range(batch):
        pieces = [_causal_sdpa(q_bhsd[b:b + 1, :, s:e], k_bhsd[b:b + 1, :, s:e], v_bhsd[b:b + 1, :, s:e], scale)
                  for s, e in document_segments(doc_ids[b])]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0).transpose(1, 2)
