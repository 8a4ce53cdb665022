"""The all-to-all of Ulysses sequence parallelism: packed, asynchronous, differentiable, counted.

Every all-to-all is one ``dist.all_to_all_single`` on a packed contiguous buffer (gloo implements
it on CPU, as NCCL does on GPU). Tensors of one dtype travel in one buffer; tensors of different
dtypes go as one ``async_op=True`` all-to-all each, all in flight at once. :func:`post` starts an
exchange, :func:`collect` waits for it and unpacks, :func:`exchange` does both; the autograd
function behind :func:`all_to_all_seq_to_heads` / :func:`all_to_all_heads_to_seq` sends the
gradients back with the inverse all-to-all. Every byte sent is counted in a :class:`UlyssesStats`.

Layouts: ``x_bshd`` [B, S/U, H, D] (a sequence slice of every head), ``x_bShd`` [B, S, H/U, D]
(every token of a head slice); ``send_uX`` [U, X] a packed buffer whose row j goes to group rank j.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

HEAD_DIM, SEQ_DIM = 2, 1  # of a [B, S, H, D] tensor

@dataclass
class UlyssesStats:
    """Counters of Ulysses traffic on this rank; read and :meth:`reset` by the trainer each step.

    An all-to-all of a local tensor of ``n`` bytes sends ``n * (U-1)/U`` (the row addressed to
    itself stays); the all-gather of document ids sends its ``n`` bytes to ``U-1`` peers.
    """

    fwd_bytes_sent: int = 0
    """Bytes sent in forwards: the q/k/v and output all-to-alls and the document-id all-gather."""
    bwd_bytes_sent: int = 0
    """Bytes sent in backwards: the inverse all-to-alls of the gradients."""
    num_all_to_all: int = 0
    """All-to-all collectives issued, forward and backward."""
    num_all_gather: int = 0
    """Document-id all-gathers issued (cache hits issue none)."""
    comm_s: float = 0.0
    """Seconds spent waiting for all-to-alls to complete: the communication not hidden behind compute."""

    @property
    def bytes_sent(self) -> int:
        """All Ulysses traffic sent by this rank."""
        return self.fwd_bytes_sent + self.bwd_bytes_sent

    def reset(self) -> None:
        """Zero every counter (call once per step)."""
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(0))

    def as_dict(self) -> Dict[str, int]:
        """Counters for a metrics logger, with the total under ``bytes_sent``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bytes_sent"] = self.bytes_sent
        return out


ULYSSES_STATS = UlyssesStats()
"""Where Ulysses counts when no ``stats`` object is passed."""



def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


@dataclass
class _Posted:
    """All-to-alls in flight: their work handles, receive buffers and how to unpack them."""

    works: list
    received: List[torch.Tensor]
    packed_shapes: Optional[List[torch.Size]]  # shapes of the tensors packed in one buffer, or None
    gather_dim: int


def post(xs: Sequence[torch.Tensor], group: Optional[dist.ProcessGroup], scatter_dim: int, gather_dim: int,
          stats: Optional[UlyssesStats], backward: bool = False) -> _Posted:
    """Start the all-to-all of :func:`_exchange` (asynchronously) and count its bytes."""
    size = group_size(group)
    for x in xs:
        if x.shape[scatter_dim] % size:
            raise ValueError(f"all-to-all over {size} ranks cannot split dim {scatter_dim} of shape "
                             f"{tuple(x.shape)}; make it a multiple of parallel.sp.ulysses={size}")
    # [..., n, ...] -> [U, ..., n/U, ...]: the chunk for rank j becomes row j.
    chunks = [x.unflatten(scatter_dim, (size, -1)).movedim(scatter_dim, 0) for x in xs]
    sizes = [c[0].numel() for c in chunks]
    if len({x.dtype for x in xs}) == 1:  # one collective on a packed buffer
        send_uX = torch.empty(size, sum(sizes), dtype=xs[0].dtype, device=xs[0].device)
        offset = 0
        for c, n in zip(chunks, sizes):
            send_uX[:, offset:offset + n].view(c.shape).copy_(c)
            offset += n
        received = [torch.empty_like(send_uX)]
        works = [dist.all_to_all_single(received[0], send_uX, group=group, async_op=True)]
        packed_shapes = [c.shape for c in chunks]
    else:  # one collective per tensor, all in flight at once
        sends = [c.contiguous() for c in chunks]
        received = [torch.empty_like(t) for t in sends]
        works = [dist.all_to_all_single(r, t, group=group, async_op=True) for r, t in zip(received, sends)]
        packed_shapes = None
    if stats is not None:
        sent = sum(n * (size - 1) * x.element_size() for n, x in zip(sizes, xs))
        stats.num_all_to_all += len(works)
        if backward:
            stats.bwd_bytes_sent += sent
        else:
            stats.fwd_bytes_sent += sent
    return _Posted(works, received, packed_shapes, gather_dim)


def collect(posted: _Posted, stats: Optional[UlyssesStats]) -> List[torch.Tensor]:
    """Wait for posted all-to-alls (the wait is the exposed communication) and unpack them."""
    t0 = time.perf_counter()
    for work in posted.works:
        work.wait()
    if stats is not None:
        stats.comm_s += time.perf_counter() - t0
    received = posted.received
    if posted.packed_shapes is not None:
        bounds = [0, *itertools.accumulate(math.prod(shape[1:]) for shape in posted.packed_shapes)]
        received = [received[0][:, lo:hi].view(shape)
                    for lo, hi, shape in zip(bounds[:-1], bounds[1:], posted.packed_shapes)]
    # [U, ..., m, ...] -> [..., U*m, ...] with the source rank as the outer index.
    return [r.movedim(0, posted.gather_dim).flatten(posted.gather_dim, posted.gather_dim + 1) for r in received]


def exchange(xs: Sequence[torch.Tensor], group: Optional[dist.ProcessGroup], scatter_dim: int,
              gather_dim: int, stats: Optional[UlyssesStats], backward: bool = False) -> List[torch.Tensor]:
    """Split each tensor into U chunks along ``scatter_dim``, send chunk j to group rank j, and
    concatenate the chunks received along ``gather_dim`` in group-rank order."""
    if group_size(group) == 1:
        return [x.clone() for x in xs]
    return collect(post(xs, group, scatter_dim, gather_dim, stats, backward), stats)


class _AllToAll(torch.autograd.Function):
    """All-to-all of several tensors in one collective; its backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, group, scatter_dim, gather_dim, stats, *xs):
        ctx.args = (group, scatter_dim, gather_dim, stats)
        return tuple(exchange(xs, group, scatter_dim, gather_dim, stats))

    @staticmethod
    def backward(ctx, *grads):
        group, scatter_dim, gather_dim, stats = ctx.args
        return (None, None, None, None, *exchange(grads, group, gather_dim, scatter_dim, stats, backward=True))


# ---------------------------------------------------------------------------- pipelined head chunks

def all_to_all_seq_to_heads(x_bshd: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                            stats: Optional[UlyssesStats] = None) -> torch.Tensor:
    """``[B, S/U, H, D]`` (a sequence slice of every head) to ``[B, S, H/U, D]`` (every token of a
    head slice), differentiably.

    Args:
        x_bshd: local slice; group rank ``u`` holds tokens ``[u*S/U, (u+1)*S/U)``.
        group: the Ulysses process group (None: the default group).
        stats: counters to add the bytes sent to (None: :data:`ULYSSES_STATS`).

    Returns:
        x_bShd: heads ``[u*H/U, (u+1)*H/U)`` of the whole sequence on group rank ``u``.

    Raises:
        ValueError: H is not a multiple of the group size.
    """
    return _AllToAll.apply(group, HEAD_DIM, SEQ_DIM, ULYSSES_STATS if stats is None else stats, x_bshd)[0]


def all_to_all_heads_to_seq(x_bShd: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                            stats: Optional[UlyssesStats] = None) -> torch.Tensor:
    """Inverse of :func:`all_to_all_seq_to_heads`: ``[B, S, H/U, D]`` to ``[B, S/U, H, D]``.

    Raises:
        ValueError: S is not a multiple of the group size.
    """
    return _AllToAll.apply(group, SEQ_DIM, HEAD_DIM, ULYSSES_STATS if stats is None else stats, x_bShd)[0]


def all_gather_seq(x_bs: torch.Tensor, group: Optional[dist.ProcessGroup], stats: Optional[UlyssesStats]
                    ) -> torch.Tensor:
    """Concatenate ``[B, s]`` slices of every group rank along the sequence (no autograd)."""
    size = group_size(group)
    src = x_bs.detach().contiguous()
    # Concatenated along dim 0 ([U*B, s]), the output form every backend accepts (gloo refuses [U, B, s]).
    out_ubs = torch.empty((size * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    # Recent torch names the tensor all-gather all_gather_single and deprecates the old name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out_ubs, src, group=group)
    out_ubs = out_ubs.unflatten(0, (size, -1))
    if stats is not None:
        stats.num_all_gather += 1
        stats.fwd_bytes_sent += src.numel() * src.element_size() * (size - 1)
    return out_ubs.movedim(0, 1).flatten(1, 2)
