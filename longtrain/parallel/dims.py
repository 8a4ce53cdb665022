"""ParallelDims: the one object that owns the parallel layout and every process group.

The layout is ``world_size = dp`` today; sequence-parallel degrees (Ulysses, ring) are added as
further axes of the same object, so callers ask it for groups by name (``group("dp")``) and never
call ``new_group`` themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch.distributed as dist


@dataclass
class ParallelDims:
    """Degrees of each parallel axis, validated against the world size.

    Args:
        world_size: number of processes.
        dp: data-parallel degree; -1 means "whatever the other axes leave".
    """

    world_size: int
    dp: int = -1
    _groups: Dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be at least 1, got {self.world_size}")
        if self.dp == -1:
            self.dp = self.world_size
        if self.dp < 1 or self.dp != self.world_size:
            raise ValueError(
                f"data-parallel degree {self.dp} does not match the world size {self.world_size}; "
                f"valid choice: dp={self.world_size}"
            )

    def build_groups(self) -> None:
        """Create every process group once. The dp group is the whole world (None = WORLD)."""
        self._groups["dp"] = None

    def group(self, axis: str) -> Optional[dist.ProcessGroup]:
        """The process group of ``axis`` (``None`` stands for the default world group)."""
        if axis not in ("dp",):
            raise KeyError(f"unknown parallel axis {axis!r}")
        return self._groups.get(axis)

    def rank(self, axis: str) -> int:
        """This process's rank within ``axis``."""
        if not dist.is_initialized():
            return 0
        return dist.get_rank(self.group(axis))

    def size(self, axis: str) -> int:
        """Size of ``axis``."""
        return {"dp": self.dp}[axis]
