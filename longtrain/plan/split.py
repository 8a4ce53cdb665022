"""What the device bytes alive at a planned step's peak are: parameters, gradients, optimizer
state, buffers (the engine's, the model's, communication buffers) and the rest (activations, the
step's input batches, an op's workspace)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Set, Tuple

KINDS = ("params", "grads", "optimizer", "buffers", "other")
PEAK_TENSORS = 12
"""How many of the largest storages alive at a peak a plan lists."""


@dataclass
class StepKinds:
    """The storages of a step by kind (tracker serials)."""

    params: Set[int]
    grads: Set[int]
    optimizer: Set[int]
    buffers: Set[int]
    """Storages the step's engine named as its working buffers."""
    inputs: Set[int]
    """The step's micro-batches (the data: neither gradients nor buffers)."""
    step_start: int
    """Serial of the last storage made before the step (what the step finds alive is a buffer, if
    not a parameter or optimizer state)."""
    comm: Set[int]
    """Storages a collective read or wrote (communication buffers)."""

    def of(self, serial: int) -> str:
        if serial in self.params:
            return "params"
        if serial in self.grads:
            return "grads"
        if serial in self.optimizer:
            return "optimizer"
        if (0 < serial <= self.step_start or serial in self.buffers
                or (serial in self.comm and serial not in self.inputs)):
            return "buffers"
        return "other"


def split(tracker, kinds: StepKinds, snapshot: Dict[int, Tuple[int, str]], phase: str,
          listed: int = PEAK_TENSORS) -> Tuple[Dict[str, int], List[dict]]:
    """Device bytes of ``snapshot`` (a tracker snapshot: serial -> (bytes, where)) by kind, and its
    ``listed`` largest storages described."""
    by_kind = dict.fromkeys(KINDS, 0)
    top = []
    for serial, (size, where) in snapshot.items():
        if where == "host":
            continue
        kind = kinds.of(serial)
        by_kind[kind] += size
        top.append((size, serial, kind))
    return by_kind, [_described(tracker, serial, size, kind, phase)
                     for size, serial, kind in sorted(top, reverse=True)[:listed]]


def _described(tracker, serial: int, size: int, kind: str, phase: str) -> dict:
    op, shape, dtype, made_in = tracker.origin.get(serial, ("workspace of the running op", (), "", phase))
    return {"bytes": size, "kind": kind, "op": op, "shape": list(shape), "dtype": dtype, "made_in": made_in}


__all__ = ["KINDS", "PEAK_TENSORS", "StepKinds", "split"]
