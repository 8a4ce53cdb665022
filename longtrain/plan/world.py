"""A fake process world for a plan: every rank's process groups exist, no collective moves data.

The planner runs the step of ONE rank of a ``world_size``-rank layout. :func:`fake_world` starts
``torch.distributed``'s ``fake`` backend (every collective returns at once and leaves its buffers
as they are; under ``FakeTensorMode`` they hold no data anyway), so ``ParallelDims.build_groups``,
Ulysses' all-to-all, the ring's send/receive and the engines' reductions run their real code. The
collectives still reach the dispatcher as ``c10d`` ops, which is where the tracker counts their
bytes.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist


@contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """``torch.distributed`` initialised with the ``fake`` backend as ``rank`` of ``world_size``
    for the duration of the block (destroyed after it). ``init_process_group`` wraps
    ``sys.excepthook`` to prefix tracebacks with the rank; the hook is put back after the block, or
    every plan of a process (a sweep, a ``--max-seq`` search) would add another prefix.

    Raises:
        RuntimeError: a process group is initialised already (a plan runs in its own process).
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is initialised already; the planner needs its own process")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    hook = sys.excepthook
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


__all__ = ["fake_world"]
