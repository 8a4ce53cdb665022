"""Apply parallelism to a model, in one place and a fixed order.

Order: (1) sequence parallelism replaces every layer's attention function. Later axes (ZeRO
through DeepSpeed) wrap the model after this, so they see the final module structure.
"""
from __future__ import annotations

import logging
from typing import Tuple

from torch import nn

from longtrain.kernels.attention import local_attention
from longtrain.parallel.dims import ParallelDims

log = logging.getLogger(__name__)


def resolve_ulysses_chunks(chunks: int, group) -> int:
    """``parallel.sp.ulysses_chunks``, with 0 (auto) resolved: 2 where collectives run asynchronously
    to compute (nccl), else 1."""
    if chunks > 0:
        return chunks
    import torch.distributed as dist

    return 2 if dist.is_initialized() and dist.get_backend(group) == "nccl" else 1


def build_sp_attention(dims: ParallelDims, seq_len: int, ulysses_chunks: int = 0):
    """The attention function for ``dims``' sequence-parallel layout.

    - ulysses only: all-to-all to the full sequence of H/U heads, local attention, all-to-all back;
    - ring only: zigzag ring attention over the ring group;
    - hybrid: Ulysses outside, ring inside (each ring rank's Ulysses-level sequence is its zigzag
      pair of chunks, see :func:`longtrain.parallel.sharding.shard_sequence`).

    Args:
        dims: the layout, with groups built.
        seq_len: tokens of a whole (unsharded) sequence.
        ulysses_chunks: head chunks pipelined through the Ulysses all-to-alls (0: auto, see
            :func:`resolve_ulysses_chunks`).
    """
    if dims.sp == 1:
        return local_attention
    inner = local_attention
    if dims.ring > 1:
        from longtrain.parallel.ring import RingAttention

        inner = RingAttention(dims.group("ring"), seq_len)
    if dims.ulysses == 1:
        return inner
    from longtrain.parallel.ulysses import UlyssesAttention

    group = dims.group("ulysses")
    return UlyssesAttention(group, inner=inner, chunks=resolve_ulysses_chunks(ulysses_chunks, group))


def apply_sequence_parallel(model: nn.Module, dims: ParallelDims, seq_len: int, ulysses_chunks: int = 0) -> None:
    """Make every attention layer of ``model`` sequence-parallel over ``dims`` (no-op at sp=1)."""
    if dims.sp == 1:
        return
    attn = build_sp_attention(dims, seq_len, ulysses_chunks)
    model.set_attention_fn(attn)
    log.info("sequence parallel: ulysses=%d x ring=%d on every attention layer (%r)", dims.ulysses, dims.ring, attn)


def sp_comm_stats() -> Tuple[int, float]:
    """(bytes sent, seconds of communication not hidden behind compute) for sequence parallelism on
    this rank so far: ring K/V hops (time waiting on them) and Ulysses all-to-alls (all their time),
    forward and backward. The trainer reports the difference per step."""
    from longtrain.parallel.ring import RING_STATS
    from longtrain.parallel.ulysses import ULYSSES_STATS

    return (RING_STATS.fwd_bytes_sent + RING_STATS.bwd_bytes_sent + ULYSSES_STATS.bytes_sent,
            RING_STATS.wait_s + ULYSSES_STATS.comm_s)
