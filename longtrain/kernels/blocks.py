"""Block attention kernels for ring attention: forward with log-sum-exp, backward from merged stats.

A *block* is the attention of a set of query tokens over a set of key tokens, each token carrying
its global index in the sequence and (optionally) its document id. Key ``j`` is visible to query
``i`` iff ``k_idx[j] <= q_idx[i]`` and ``q_doc[b, i] == k_doc[b, j]``. Ring attention computes one
block per visiting K/V shard, merges the partial outputs with :func:`merge_partials` (online
softmax, Milakov & Gimelshein 2018; flash-attention), and runs the standard flash-attention
backward per block from the *merged* output and log-sum-exp (FlashAttention-2, Algorithm 2).

The reference kernels here are plain torch: dense scores per tile of queries, keys past the
tile's last query dropped, fp32 math (fp64 for fp64 inputs). They run everywhere, are the
specification the tests hold the fused executors to (:mod:`longtrain.kernels.fused` for flash
attention, :mod:`longtrain.kernels.cudnn`), and the fallback: which executor runs a block is
:class:`longtrain.kernels.dispatch.AttentionKernels`' choice, for every caller. Their contracts
(arguments, the returned lse, the backward from merged statistics) are those of its ``forward``
and ``backward``.

Layout legend:
    q_bshd      [batch, q_seq, num_heads, head_dim]       queries of the block
    k_bshd      [batch, k_seq, num_kv_heads, head_dim]    keys of the block
    v_bshd      [batch, k_seq, num_kv_heads, head_dim]    values of the block
    out_bshd    [batch, q_seq, num_heads, head_dim]       attention output (or its gradient dout)
    lse_bhs     [batch, num_heads, q_seq]                 log-sum-exp of the masked scaled scores
    q_idx/k_idx [q_seq] / [k_seq] int64 global token indices
    q_doc/k_doc [batch, q_seq] / [batch, k_seq] integer document ids, or None for one document
    *_bkgsd     [batch, num_kv_heads, group, seq, head_dim] query-side tensors split by KV head
    *_bksd      [batch, num_kv_heads, seq, head_dim]       key-side tensors
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Q_TILE = 1024  # queries per tile in the reference kernels: bounds the dense score tile's memory



def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_docs(q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``q_doc`` and ``k_doc`` are both given or both None."""
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc must both be given or both be None")


def _visible(q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: Optional[torch.Tensor],
             k_doc: Optional[torch.Tensor]) -> torch.Tensor:
    """[B or 1, q_seq, k_seq] bool: which keys each query may see."""
    mask = k_idx[None, None, :] <= q_idx[None, :, None]
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    return mask


def has_visible_keys(q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: Optional[torch.Tensor] = None,
                     k_doc: Optional[torch.Tensor] = None) -> bool:
    """Cheap conservative test: False only when no query of the block can see any of its keys.

    Checks the causal order (every key after every query) and, with documents, whether any row
    shares a document id between queries and keys. Never returns False for a block with a visible
    pair; may return True for an empty one (then the kernel simply yields lse = -inf).
    """
    check_docs(q_doc, k_doc)
    if q_idx.numel() == 0 or k_idx.numel() == 0:
        return False
    if bool(k_idx.min() > q_idx.max()):
        return False
    if q_doc is None:
        return True
    return any(bool(torch.isin(q_doc[b], k_doc[b]).any()) for b in range(q_doc.shape[0]))


def _split_heads(q_bshd: torch.Tensor, num_kv: int, dtype: torch.dtype) -> torch.Tensor:
    batch, seq, heads, dim = q_bshd.shape
    if heads % num_kv:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({num_kv})")
    return q_bshd.to(dtype).transpose(1, 2).reshape(batch, num_kv, heads // num_kv, seq, dim)


def _merge_heads(x_bkgsd: torch.Tensor) -> torch.Tensor:
    batch, num_kv, group, seq, dim = x_bkgsd.shape
    return x_bkgsd.reshape(batch, num_kv * group, seq, dim).transpose(1, 2)


def _key_window(q_idx_tile: torch.Tensor, k_idx: torch.Tensor) -> Tuple[bool, Optional[torch.Tensor]]:
    """(any key visible, indices of keys not after the tile's last query or None for all)."""
    keep = k_idx <= q_idx_tile.max()
    if bool(keep.all()):
        return True, None
    sel = keep.nonzero().flatten()
    return sel.numel() > 0, sel


def check_shapes(q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor, q_idx: torch.Tensor,
                  k_idx: torch.Tensor) -> None:
    """Raise ``ValueError`` unless q/k/v and the token indices have the block shapes of the legend."""
    if k_bshd.shape != v_bshd.shape or q_bshd.shape[0] != k_bshd.shape[0] or q_bshd.shape[3] != k_bshd.shape[3]:
        raise ValueError(f"q/k/v shapes disagree: {tuple(q_bshd.shape)}, {tuple(k_bshd.shape)}, "
                         f"{tuple(v_bshd.shape)}")
    if q_idx.shape != (q_bshd.shape[1],) or k_idx.shape != (k_bshd.shape[1],):
        raise ValueError(f"q_idx/k_idx must be [q_seq]/[k_seq], got {tuple(q_idx.shape)}/{tuple(k_idx.shape)}")


def _tile_keys(t0: int, t1: int, q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: Optional[torch.Tensor],
               k_doc: Optional[torch.Tensor], k_bksd: torch.Tensor, v_bksd: torch.Tensor):
    """Keys and values a query tile ``[t0, t1)`` can see, its mask, and the selected key positions
    (None: all keys); None when it sees no key."""
    any_key, sel = _key_window(q_idx[t0:t1], k_idx)
    if not any_key:
        return None
    k_t, v_t, k_idx_t, k_doc_t = k_bksd, v_bksd, k_idx, k_doc
    if sel is not None:
        k_t, v_t, k_idx_t = k_bksd.index_select(3, sel), v_bksd.index_select(3, sel), k_idx[sel]
        k_doc_t = None if k_doc is None else k_doc.index_select(1, sel)
    return k_t, v_t, _visible(q_idx[t0:t1], k_idx_t, None if q_doc is None else q_doc[:, t0:t1], k_doc_t), sel


def reference_block_forward(q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor,
                            q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: Optional[torch.Tensor],
                            k_doc: Optional[torch.Tensor], scale: float,
                            q_tile: int = Q_TILE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of queries over one key block, with the per-row log-sum-exp.

    Args:
        q_bshd: [B, Sq, Hq, D] queries.
        k_bshd: [B, Sk, Hkv, D] keys; ``Hq = g * Hkv`` and query head ``h`` reads KV head ``h // g``.
        v_bshd: [B, Sk, Hkv, D] values.
        q_idx: [Sq] int64 global indices of the queries.
        k_idx: [Sk] int64 global indices of the keys.
        q_doc: [B, Sq] document ids of the queries, or None (one document).
        k_doc: [B, Sk] document ids of the keys, or None (one document).
        scale: softmax scale applied to ``q . k``.
        q_tile: queries per tile (bounds the dense score tile's memory).

    Returns:
        ``(out_bshd, lse_bhs)``: ``out`` [B, Sq, Hq, D] in q's dtype; ``lse`` [B, Hq, Sq] in fp32
        (fp64 for fp64 inputs). Rows with no visible key get ``out = 0`` and ``lse = -inf``.

    Raises:
        ValueError: inconsistent shapes, or only one of ``q_doc``/``k_doc`` given.
    """
    check_shapes(q_bshd, k_bshd, v_bshd, q_idx, k_idx)
    check_docs(q_doc, k_doc)
    dtype = _compute_dtype(q_bshd, k_bshd, v_bshd)
    num_kv = k_bshd.shape[2]
    q_bkgsd = _split_heads(q_bshd, num_kv, dtype)
    k_bksd = k_bshd.to(dtype).transpose(1, 2).unsqueeze(2)
    v_bksd = v_bshd.to(dtype).transpose(1, 2).unsqueeze(2)
    out_bkgsd = torch.zeros_like(q_bkgsd)
    lse_bkgs = torch.full(q_bkgsd.shape[:-1], float("-inf"), dtype=dtype, device=q_bshd.device)
    for t0 in range(0, q_bshd.shape[1], q_tile):
        t1 = min(t0 + q_tile, q_bshd.shape[1])
        tile = _tile_keys(t0, t1, q_idx, k_idx, q_doc, k_doc, k_bksd, v_bksd)
        if tile is None:
            continue
        k_t, v_t, mask, sel = tile
        scores = torch.matmul(q_bkgsd[:, :, :, t0:t1], k_t.transpose(-1, -2)) * scale
        scores.masked_fill_(~mask[:, None, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0).unsqueeze(-1))
        out_bkgsd[:, :, :, t0:t1] = torch.matmul(probs, v_t)
        lse_bkgs[:, :, :, t0:t1] = lse
    batch, _, _, seq = lse_bkgs.shape
    return _merge_heads(out_bkgsd).to(q_bshd.dtype), lse_bkgs.reshape(batch, -1, seq)


def reference_block_backward(dout_bshd: torch.Tensor, q_bshd: torch.Tensor, k_bshd: torch.Tensor,
                             v_bshd: torch.Tensor, out_bshd: torch.Tensor, lse_bhs: torch.Tensor,
                             q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: Optional[torch.Tensor],
                             k_doc: Optional[torch.Tensor], scale: float, q_tile: int = Q_TILE
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of the attention gradients, given the *merged* output and lse.

    With ``P = exp(scale * Q K^T - lse)`` (masked), ``dV = P^T dO``, ``dP = dO V^T``,
    ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``;
    under GQA the key/value gradients are summed over each query group. Summing the results over
    all key blocks gives the exact gradients of the full attention.

    Args:
        dout_bshd: [B, Sq, Hq, D] gradient of the merged output.
        q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale, q_tile: as
            :func:`reference_block_forward`.
        out_bshd: [B, Sq, Hq, D] merged output over *all* key blocks.
        lse_bhs: [B, Hq, Sq] merged log-sum-exp over all key blocks.

    Returns:
        ``(dq_bshd, dk_bshd, dv_bshd)`` in the dtypes of q, k, v (computed in fp32, fp64 for fp64).
    """
    check_shapes(q_bshd, k_bshd, v_bshd, q_idx, k_idx)
    check_docs(q_doc, k_doc)
    dtype = _compute_dtype(q_bshd, k_bshd, v_bshd)
    num_kv = k_bshd.shape[2]
    q_bkgsd = _split_heads(q_bshd, num_kv, dtype)
    do_bkgsd = _split_heads(dout_bshd, num_kv, dtype)
    # D_i = rowsum(dO_i * O_i) with the merged O: the softmax-Jacobian term (FlashAttention-2, eq. 4).
    delta_bkgs1 = (do_bkgsd * _split_heads(out_bshd, num_kv, dtype)).sum(-1, keepdim=True)
    lse_bkgs1 = lse_bhs.to(dtype).reshape(q_bkgsd.shape[:-1]).unsqueeze(-1)
    lse_bkgs1 = lse_bkgs1.masked_fill(torch.isneginf(lse_bkgs1), 0.0)  # such rows see no key: P = 0
    k_bksd = k_bshd.to(dtype).transpose(1, 2).unsqueeze(2)
    v_bksd = v_bshd.to(dtype).transpose(1, 2).unsqueeze(2)
    dq_bkgsd = torch.zeros_like(q_bkgsd)
    dk_bksd = torch.zeros_like(k_bksd.squeeze(2))
    dv_bksd = torch.zeros_like(dk_bksd)
    for t0 in range(0, q_bshd.shape[1], q_tile):
        t1 = min(t0 + q_tile, q_bshd.shape[1])
        tile = _tile_keys(t0, t1, q_idx, k_idx, q_doc, k_doc, k_bksd, v_bksd)
        if tile is None:
            continue
        k_t, v_t, mask, sel = tile
        q_t, do_t = q_bkgsd[:, :, :, t0:t1], do_bkgsd[:, :, :, t0:t1]
        scores = torch.matmul(q_t, k_t.transpose(-1, -2)) * scale
        probs = torch.exp(scores - lse_bkgs1[:, :, :, t0:t1]).masked_fill_(~mask[:, None, None], 0.0)
        dv_t = torch.matmul(probs.transpose(-1, -2), do_t).sum(2)  # GQA: sum over the query group
        dprobs = torch.matmul(do_t, v_t.transpose(-1, -2))
        dscores = probs * (dprobs - delta_bkgs1[:, :, :, t0:t1])
        dq_bkgsd[:, :, :, t0:t1] = torch.matmul(dscores, k_t) * scale
        dk_t = torch.matmul(dscores.transpose(-1, -2), q_t).sum(2) * scale
        if sel is None:
            dk_bksd += dk_t
            dv_bksd += dv_t
        else:
            dk_bksd.index_add_(2, sel, dk_t)
            dv_bksd.index_add_(2, sel, dv_t)
    return (_merge_heads(dq_bkgsd).to(q_bshd.dtype), dk_bksd.transpose(1, 2).to(k_bshd.dtype),
            dv_bksd.transpose(1, 2).to(v_bshd.dtype))


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions of the same queries over disjoint key sets (online softmax).

    ``lse = log(exp(lse_a) + exp(lse_b))`` and ``out = exp(lse_a - lse) out_a + exp(lse_b - lse)
    out_b``, in fp32 (fp64 if any input is fp64). Either side may be ``-inf`` (no visible key);
    rows empty on both sides stay ``out = 0``, ``lse = -inf``.

    Args:
        out_a: [B, S, H, D] partial output over key set A.
        lse_a: [B, H, S] its log-sum-exp.
        out_b: [B, S, H, D] partial output over key set B.
        lse_b: [B, H, S] its log-sum-exp.

    Returns:
        ``(out_bshd, lse_bhs)`` in the compute dtype.
    """
    dtype = _compute_dtype(out_a, lse_a, out_b, lse_b)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    lse = torch.logaddexp(lse_a, lse_b)
    lse_safe = lse.masked_fill(torch.isneginf(lse), 0.0)
    w_a = torch.exp(lse_a - lse_safe).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    w_b = torch.exp(lse_b - lse_safe).transpose(1, 2).unsqueeze(-1)
    return out_a.to(dtype) * w_a + out_b.to(dtype) * w_b, lse
