"""Sharding of a sequence over the sequence-parallel ranks.

Ring attention with a causal mask gives rank ``r`` of ``R`` the chunks ``r`` and ``2R-1-r`` of
``2R`` equal chunks ("zigzag"): a rank holding an early chunk also holds a late one, so every rank
attends over the same number of (query, key) pairs.

Layout legend:
    x           any tensor with the sequence along ``dim`` (``[B, S, ...]`` by default)
    idx_s       [S_local] global token indices held by one rank
"""
from __future__ import annotations

from typing import List, Sequence

import torch


def _check(seq_len: int, ring_size: int, ring_rank: int) -> int:
    if ring_size < 1:
        raise ValueError(f"parallel.sp.ring: ring size must be at least 1, got {ring_size}")
    if not 0 <= ring_rank < ring_size:
        raise ValueError(f"ring rank {ring_rank} is outside 0..{ring_size - 1}")
    divisor = 2 * ring_size
    if seq_len % divisor:
        raise ValueError(f"data.seq_len={seq_len} must be divisible by 2 * parallel.sp.ring = {divisor} "
                         f"for zigzag sharding; pick a multiple of {divisor}")
    return seq_len // divisor


def zigzag_indices(seq_len: int, ring_size: int, ring_rank: int) -> torch.Tensor:
    """Global token indices held by one ring rank under zigzag sharding.

    Args:
        seq_len: full sequence length S.
        ring_size: number of ring ranks R.
        ring_rank: this rank's index in the ring, ``0 <= ring_rank < R``.

    Returns:
        idx_s: [S / R] int64, chunk ``ring_rank`` then chunk ``2R-1-ring_rank`` of ``2R`` chunks.

    Raises:
        ValueError: ``seq_len`` is not a multiple of ``2 * ring_size``, or the rank is out of range.
    """
    chunk = _check(seq_len, ring_size, ring_rank)
    late = 2 * ring_size - 1 - ring_rank
    return torch.cat([torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk),
                      torch.arange(late * chunk, (late + 1) * chunk)])


def zigzag_shard(x: torch.Tensor, ring_size: int, ring_rank: int, dim: int = 1) -> torch.Tensor:
    """This ring rank's zigzag shard of ``x`` along ``dim``.

    Args:
        x: tensor whose ``dim`` is the full sequence.
        ring_size: number of ring ranks R.
        ring_rank: this rank's index in the ring.
        dim: the sequence dimension.

    Returns:
        ``x`` restricted to :func:`zigzag_indices` along ``dim`` (a new tensor).

    Raises:
        ValueError: as :func:`zigzag_indices`.
    """
    chunk = _check(x.shape[dim], ring_size, ring_rank)
    late = 2 * ring_size - 1 - ring_rank
    return torch.cat([x.narrow(dim, ring_rank * chunk, chunk), x.narrow(dim, late * chunk, chunk)], dim=dim)


def zigzag_unshard(parts: Sequence[torch.Tensor], ring_size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`zigzag_shard`: the full sequence from every rank's shard.

    Args:
        parts: the ``ring_size`` shards, in ring-rank order.
        ring_size: number of ring ranks R.
        dim: the sequence dimension.

    Returns:
        The tensor of full sequence length along ``dim``.

    Raises:
        ValueError: wrong number of parts or a shard of odd length.
    """
    if len(parts) != ring_size:
        raise ValueError(f"expected {ring_size} shards, got {len(parts)}")
    local = parts[0].shape[dim]
    if local % 2 or any(p.shape[dim] != local for p in parts):
        raise ValueError(f"every shard needs the same even length along dim {dim}")
    chunk = local // 2
    chunks: List[torch.Tensor] = [None] * (2 * ring_size)
    for r, part in enumerate(parts):
        chunks[r] = part.narrow(dim, 0, chunk)
        chunks[2 * ring_size - 1 - r] = part.narrow(dim, chunk, chunk)
    return torch.cat(chunks, dim=dim)


def shard_sequence(x: torch.Tensor, ring_size: int, ring_rank: int, ulysses_size: int, ulysses_rank: int,
                   dim: int = 1) -> torch.Tensor:
    """This rank's part of a whole sequence under a ulysses x ring layout.

    The ring level comes first (zigzag pair of chunks when ``ring_size > 1``), then the Ulysses
    level cuts that into ``ulysses_size`` contiguous slices. The Ulysses all-to-all gathers the
    slices back, so inside attention each ring rank sees exactly its zigzag pair, the layout
    :func:`longtrain.parallel.ring.zigzag_ring_attention` expects.
    """
    if ring_size > 1:
        x = zigzag_shard(x, ring_size, ring_rank, dim=dim)
    if ulysses_size > 1:
        if x.shape[dim] % ulysses_size:
            raise ValueError(f"a sequence of {x.shape[dim]} tokens does not split over parallel.sp.ulysses="
                             f"{ulysses_size}; make data.seq_len a multiple of {ulysses_size * max(1, 2 * ring_size)}")
        x = x.chunk(ulysses_size, dim=dim)[ulysses_rank]
    return x


def shard_batch(batch: dict, dims) -> dict:
    """Every ``[B, S]`` tensor of ``batch`` cut to this rank's part (see :func:`shard_sequence`).

    Labels were shifted before sharding (label t is token t+1 of the whole sequence), so no label
    is lost at a shard edge; position ids keep their global (per-document) values.

    Args:
        batch: tensors ``[B, S]`` (input_ids, labels, position_ids, doc_ids, ...).
        dims: the :class:`longtrain.parallel.dims.ParallelDims` of the run.
    """
    if dims.sp == 1:
        return batch
    return {k: shard_sequence(v, dims.ring, dims.rank("ring"), dims.ulysses, dims.rank("ulysses")).contiguous()
            for k, v in batch.items()}
