"""Process-group start-up from torchrun's environment, and the few collectives the loop uses.

Every collective here is a no-op in a single process, so the loop has one code path whether it
runs under torchrun or as a plain ``python -m longtrain.train``.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    """Where this process sits: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """The one rank that writes files, logs and plots."""
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 600,
                     require_group: bool = False) -> DistInfo:
    """Join the process group described by torchrun's environment (or run alone without it).

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        backend: ``auto`` (nccl with CUDA, gloo on CPU), ``nccl`` or ``gloo``.
        timeout_s: collective timeout, so a dead rank stops the others instead of hanging them.
        require_group: start a one-rank group when running alone (the DeepSpeed engine needs one).

    Raises:
        ValueError: ``trainer.device=cuda`` without a GPU, or nccl requested on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("trainer.device: cuda requested but no GPU is visible; use trainer.device=cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("parallel.backend: nccl needs CUDA devices; use parallel.backend=gloo on CPU")
    timeout = datetime.timedelta(seconds=timeout_s)
    device_id = dev if dev.type == "cuda" else None
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    elif require_group and not dist.is_initialized():  # alone: an in-memory store, no port needed
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)  # DeepSpeed reads them even with a group in place
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device_id)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def destroy_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group`` and return it (identity alone)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_objects(obj, group: Optional[dist.ProcessGroup] = None) -> List:
    """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup] = None,
                         bucket_bytes: int = 32 << 20) -> None:
    """Sum gradients over ``group`` in flat buckets.

    The loss each rank back-propagates is already divided by the *global* count of valid tokens
    (see DESIGN.md, loss normalisation), so the gradients are summed, never averaged: averaging
    here would divide by the world size a second time.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: List[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None and (not bucket or (g.dtype == bucket[0].dtype and size < bucket_bytes)):
            bucket.append(g)
            size += g.numel() * g.element_size()
            continue
        if bucket:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)
        bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)
