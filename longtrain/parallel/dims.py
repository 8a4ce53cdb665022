"""ParallelDims: the one object that owns the parallel layout and every process group.

Layout: ``world_size = dp x ring x ulysses``. Ranks are numbered with Ulysses fastest, then ring,
then data parallel: ``rank = (dp_idx * ring + ring_idx) * ulysses + ulysses_idx``, so a Ulysses
group (the all-to-all, the most bandwidth-hungry collective) is a block of consecutive ranks,
normally inside one node, and ring neighbours are ``ulysses`` ranks apart.

Axes handed out by name:
- ``ulysses``: ranks that all-to-all heads against sequence;
- ``ring``: ranks that pass K/V blocks round a ring;
- ``sp``: ``ulysses x ring``, the ranks that share one sequence;
- ``dp``: ranks that hold different sequences (same ulysses and ring index);
- ``dp_sp``: every rank; gradients and token counts are summed over it (SP ranks see different
  tokens of the same sequences, so for the loss and the gradients they are data-parallel too).

No other module creates process groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.distributed as dist

from longtrain.models.args import divisors

AXES = ("dp", "ring", "ulysses", "sp", "dp_sp")



@dataclass
class ParallelDims:
    """Degrees of each parallel axis, validated against the world size.

    Args:
        world_size: number of processes.
        ulysses: Ulysses (all-to-all) sequence-parallel degree.
        ring: ring-attention sequence-parallel degree.
        dp: data-parallel degree; -1 means ``world_size // (ulysses * ring)``.

    Raises:
        ValueError: the degrees do not multiply to the world size; the message lists valid choices.
    """

    world_size: int
    ulysses: int = 1
    ring: int = 1
    dp: int = -1
    _groups: Dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict, init=False, repr=False)
    _ranks: Dict[str, List[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be at least 1, got {self.world_size}")
        for key, value in (("parallel.sp.ulysses", self.ulysses), ("parallel.sp.ring", self.ring)):
            if value < 1:
                raise ValueError(f"{key}: must be at least 1, got {value}")
        sp = self.ulysses * self.ring
        if self.world_size % sp:
            raise ValueError(
                f"parallel.sp.ulysses x parallel.sp.ring = {self.ulysses} x {self.ring} = {sp} does not divide the "
                f"world size {self.world_size}; the sequence-parallel degree must be one of "
                f"{divisors(self.world_size)}")
        if self.dp == -1:
            self.dp = self.world_size // sp
        if self.dp * sp != self.world_size:
            raise ValueError(f"dp x ulysses x ring = {self.dp} x {self.ulysses} x {self.ring} != world size "
                             f"{self.world_size}; valid choice: dp={self.world_size // sp}")

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (ulysses x ring)."""
        return self.ulysses * self.ring

    def describe(self) -> str:
        """One line naming the layout, e.g. ``dp=2 x ring=2 x ulysses=1``."""
        return f"dp={self.dp} x ring={self.ring} x ulysses={self.ulysses}"

    # ------------------------------------------------------------------ validation against the job
    def validate_model(self, num_heads: int, num_kv_heads: int) -> None:
        """Ulysses splits query heads over its degree (KV heads are replicated as needed).

        Raises:
            ValueError: naming the valid Ulysses degrees and the hybrid layout as the way out.
        """
        if self.ulysses > 1:
            from longtrain.parallel.ulysses import validate_ulysses

            validate_ulysses(num_heads, num_kv_heads, self.ulysses)

    @property
    def seq_len_unit(self) -> int:
        """Sequence lengths this layout can cut are the multiples of this: ``2 x ring`` zigzag
        chunks (ring) each split over Ulysses."""
        return self.ulysses * (2 * self.ring if self.ring > 1 else 1)

    def validate_seq_len(self, seq_len: int) -> None:
        """The sequence must be a multiple of :attr:`seq_len_unit`.

        Raises:
            ValueError: naming data.seq_len and the nearest valid lengths.
        """
        unit = self.seq_len_unit
        if seq_len % unit:
            lower, upper = seq_len // unit * unit, (seq_len // unit + 1) * unit
            raise ValueError(f"data.seq_len={seq_len} must be a multiple of {unit} for ulysses={self.ulysses} x "
                             f"ring={self.ring} (ring splits each sequence into 2 x ring chunks); use "
                             f"data.seq_len={upper}" + (f" or {lower}" if lower else ""))

    # ------------------------------------------------------------------ coordinates and groups
    def coords(self, rank: int) -> Dict[str, int]:
        """Index of ``rank`` along each basic axis (dp, ring, ulysses)."""
        return {"dp": rank // self.sp, "ring": (rank // self.ulysses) % self.ring, "ulysses": rank % self.ulysses}

    def group_ranks(self, axis: str, rank: int) -> List[int]:
        """Global ranks of ``rank``'s group along ``axis`` (pure arithmetic; no process group needed)."""
        c = self.coords(rank)
        base = c["dp"] * self.sp
        if axis == "ulysses":
            start = base + c["ring"] * self.ulysses
            return list(range(start, start + self.ulysses))
        if axis == "ring":
            return [base + i * self.ulysses + c["ulysses"] for i in range(self.ring)]
        if axis == "sp":
            return list(range(base, base + self.sp))
        if axis == "dp":
            return [d * self.sp + c["ring"] * self.ulysses + c["ulysses"] for d in range(self.dp)]
        if axis == "dp_sp":
            return list(range(self.world_size))
        raise KeyError(f"unknown parallel axis {axis!r}; axes: {AXES}")

    def build_groups(self) -> None:
        """Create every process group once (every rank must call this, in the same order)."""
        if not dist.is_initialized():
            return
        me = dist.get_rank()
        for axis in AXES:
            if axis == "dp_sp":
                self._groups[axis], self._ranks[axis] = dist.group.WORLD, list(range(self.world_size))
                continue
            seen = set()
            for r in range(self.world_size):
                ranks = tuple(self.group_ranks(axis, r))
                if ranks in seen:
                    continue
                seen.add(ranks)
                group = dist.new_group(list(ranks))
                if me in ranks:
                    self._groups[axis], self._ranks[axis] = group, list(ranks)

    def group(self, axis: str) -> Optional[dist.ProcessGroup]:
        """The process group of ``axis`` (None in a single process)."""
        if axis not in AXES:
            raise KeyError(f"unknown parallel axis {axis!r}; axes: {AXES}")
        return self._groups.get(axis)

    def rank(self, axis: str) -> int:
        """This process's rank within ``axis``."""
        if not dist.is_initialized():
            return 0
        me = dist.get_rank()
        if axis == "dp_sp":
            return me
        return self.coords(me)[axis] if axis in ("dp", "ring", "ulysses") else self.group_ranks(axis, me).index(me)

    def size(self, axis: str) -> int:
        """Size of ``axis``."""
        return {"dp": self.dp, "ring": self.ring, "ulysses": self.ulysses, "sp": self.sp,
                "dp_sp": self.world_size}[axis]
