"""Planning a step of many micro-batches from three: the micro-batches between the first and the last repeat.

A step of ``G`` micro-batches (gradient accumulation) runs the first one, which makes the
gradients' storage, ``G - 2`` middle ones, which find everything in place and accumulate into
it, and the last one, the accumulation boundary, where the engine reduces the gradients (the
plain engine and ZeRO-1 at the boundary only; ZeRO-2 and 3 as they arrive, in every micro-batch).
The middle ones are alike to the byte: the same storages are made and freed in the same order,
with the same FLOPs, op times, host copies and collectives. So a fake step of ``G > 3``
micro-batches plans three, the first, one middle and the last, and adds the middle one's sums
``G - 3`` times more (:func:`repeat`); the peak of each place in the step (the tracker's local
peaks) is the same in every middle micro-batch, so it is found in the one planned.

The step's token count, loss normalisation and the optimizer step are those of ``G``
micro-batches (the count of valid labels is summed over all of them, as training sums it). A
step whose MoE balancer counts its micro-batches (the load balancing over the whole batch) plans
every one. ``tests/unit/test_plan_micro.py`` holds such plans equal to plans of every micro-batch
for the plain engine and ZeRO 1-3, every memory mode, Ulysses and ring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

PLANNED = 3
"""Micro-batches a long step plans: the first, one middle one and the last."""


def planned_micro_batches(batches: List[dict], every: bool) -> List[dict]:
    """The micro-batches to plan of ``batches``: all (``every``, or at most :data:`PLANNED`), else
    the first, the second and the last."""
    if every or len(batches) <= PLANNED:
        return batches
    return [batches[0], batches[1], batches[-1]]


@dataclass(frozen=True)
class Sums:
    """What a tracker has summed over the step so far."""

    flops: int
    time_s: float
    compute_s: float
    memory_s: float
    seconds: Dict[str, float]
    host_copy_s: float
    collectives: int


def sums(tracker) -> Sums:
    """The sums of ``tracker`` (a :class:`~longtrain.plan.tracker.StepTracker`) now, between two
    micro-batches (its clock's open window is closed first: the next micro-batch opens another)."""
    tracker.timeline.close()
    t = tracker.timeline
    return Sums(tracker.flops, tracker.time_s, tracker.compute_s, tracker.memory_s, dict(t.seconds), t.host_copy_s,
                len(tracker.collectives))


def repeat(tracker, start: Sums, end: Sums, times: int) -> None:
    """Add to ``tracker`` ``times`` more of what it summed between ``start`` and ``end`` (one middle
    micro-batch): FLOPs, op times, the clock's seconds and host copies, and the collectives."""
    tracker.flops += times * (end.flops - start.flops)
    tracker.time_s += times * (end.time_s - start.time_s)
    tracker.compute_s += times * (end.compute_s - start.compute_s)
    tracker.memory_s += times * (end.memory_s - start.memory_s)
    t = tracker.timeline
    for category in t.seconds:
        t.seconds[category] += times * (end.seconds[category] - start.seconds[category])
    t.host_copy_s += times * (end.host_copy_s - start.host_copy_s)
    tracker.collectives.extend(tracker.collectives[start.collectives:end.collectives] * times)


class MiddleMarks:
    """The sums before the second and the third planned micro-batch, when a step is shortened:
    what one middle micro-batch adds."""

    def __init__(self, tracker, planned: int, total: int) -> None:
        self.tracker, self.times = tracker, total - planned
        self.marks: List[Sums] = []

    def before_forward(self, index: int) -> None:
        if self.times and index in (1, 2):
            self.marks.append(sums(self.tracker))

    def finish(self) -> Optional[int]:
        """Add the repeated middle micro-batches; returns how many micro-batches were planned
        (None: every one)."""
        if not self.times:
            return None
        repeat(self.tracker, *self.marks, self.times)
        return PLANNED


__all__ = ["MiddleMarks", "PLANNED", "Sums", "planned_micro_batches", "repeat", "sums"]
