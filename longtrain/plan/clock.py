"""The planner's clock: each op's time from the rate kernels reach on the target GPU, host copies with
their overlap, a host optimizer's step, and what bounds the step.

:class:`Clock` times one op (the tracker hands it every op of the step) by its kind, with the
target's :class:`~longtrain.plan.gpus.Rates` (``gpus.py`` gives every figure's source):

- **matmul** (an op with FLOPs that is not attention): ``flops / matmul_flops + matmul_ramp_s``,
  i.e. the large-GEMM rate times the saturating efficiency ``F / (F + matmul_flops x ramp)``: a
  1024^3 GEMM runs at half the rate on an H100, an 8192^3 one within 0.2% of it. Skinny GEMMs are
  slowed by the memory term below (their bytes per FLOP are high);
- **attention** (flash varlen ops, SDPA's flash / cuDNN / memory-efficient ops, and the CPU flash op
  that stands for CUDA's flash in a plan): ``flops x f / rate(backend, head size)`` with the
  backend's measured forward + backward rate, ``f = 1`` forward and ``1.25`` backward: the rates are
  in the FlashAttention papers' convention (the backward does 2.5 forwards of work: it recomputes the
  scores), the tracker counts the backward's four matmuls (2 forwards). A head size not in the table
  takes the nearest one's rate;
- **memory** (every other op): ``bytes read and written / (hbm_fraction x HBM bandwidth)``;
  allocations (``empty*``) move nothing;
- every device op takes the larger of its compute and its memory term (a roofline at achieved rates).

Ops that touch host memory (storages the tracker counts as host: offloaded layer inputs, ZeRO-Offload's
pinned buffers and host optimizer state) are not device work: an op that writes host memory from
device tensors is a device-to-host copy, one that reads host memory into the device a host-to-device
copy, both ``bytes / host_link``; an op wholly in host memory runs on the host at
``host_memory`` bandwidth and counts with the host optimizer, whose arithmetic a plan skips
(:class:`~longtrain.plan.fakes.HostAdamStandIn`) and :meth:`Clock.host_optimizer_seconds` adds:
``7/3 x`` its fp32 state (master weights and Adam moments read and written, the fp32 gradient read)
``/ host_memory``.

:class:`Timeline` adds the ops up and models overlap. Host copies: a device-to-host copy runs on a
side stream (StreamBP's ``HostCopy``, DeepSpeed's gradient offload) and overlaps the device work of
its phase window (the run of ops of one phase: a micro-batch's forward, its backward, the optimizer
step); only what exceeds that work is exposed. A host-to-device copy (``HostCopy.fetch``, the
updated parameters after a host step) runs on the compute stream and is exposed whole. The host
optimizer's step is exposed (it waits for the gradients and the next forward waits for it).
Communication keeps :mod:`~longtrain.plan.comm`'s bandwidth times, given twice: no overlap
(everything one after the other) and overlap (communication hidden behind the device work and
exposed copies, the host optimizer after both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from longtrain.plan.gpus import Gpu, Rates

aten = torch.ops.aten

DEVICE_CATEGORIES = ("matmul", "attention", "memory")
CATEGORIES = DEVICE_CATEGORIES + ("host_copy_exposed", "host_optimizer", "comm_exposed")
"""The keys of a plan's ``time_breakdown`` (seconds; they add up to its ``time_s``)."""

BACKWARD_WORK = 1.25
"""A backward attention op's work per counted FLOP in the rates' convention (2.5 forwards / 2)."""

HOST_OPTIMIZER_TRAFFIC = 7 / 3
"""Host bytes a CPU AdamW step moves per byte of its fp32 state (master weights, two moments: 12
bytes per parameter read and written, plus the 4-byte fp32 gradient read = 28 / 12)."""


_ATTENTION = {
    "_flash_attention_forward": ("flash", False), "_flash_attention_backward": ("flash", True),
    "_scaled_dot_product_flash_attention": ("flash", False),
    "_scaled_dot_product_flash_attention_backward": ("flash", True),
    "_scaled_dot_product_flash_attention_for_cpu": ("flash", False),  # CUDA's flash in a plan
    "_scaled_dot_product_flash_attention_for_cpu_backward": ("flash", True),
    "_scaled_dot_product_cudnn_attention": ("cudnn", False),
    "_scaled_dot_product_cudnn_attention_backward": ("cudnn", True),
    "_scaled_dot_product_efficient_attention": ("efficient", False),
    "_scaled_dot_product_efficient_attention_backward": ("efficient", True),
    "_efficient_attention_forward": ("efficient", False), "_efficient_attention_backward": ("efficient", True),
}
"""aten op -> (backend, backward) of every attention op the clock knows; each takes the query first
(forward) or second, after the output's gradient (backward)."""


def _known(names: Dict[str, Tuple[str, bool]]) -> Dict[object, Tuple[str, bool]]:
    out = {}
    for name, kind in names.items():
        try:
            out[getattr(aten, name)] = kind
        except (AttributeError, RuntimeError):  # an op this torch build lacks
            pass
    return out


ATTENTION_OPS = _known(_ATTENTION)

FREE_OPS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided}
"""Allocations: no kernel runs (the tracker still counts their storage)."""


def nearest_rate(by_dim: Dict[int, float], head_dim: int) -> float:
    """The rate of the tabulated head size nearest ``head_dim`` (on a log scale; the smaller on a tie)."""
    dim = min(sorted(by_dim), key=lambda d: abs(math.log2(d / max(head_dim, 1))))
    return by_dim[dim]


class Clock:
    """Seconds of each op on ``gpu`` at its achieved rates (module docstring).

    Args:
        gpu: the target; its :meth:`~longtrain.plan.gpus.Gpu.achieved` rates time the ops.
    """

    def __init__(self, gpu: Gpu) -> None:
        self.gpu, self.rates = gpu, gpu.achieved()
        self._hbm = self.rates.hbm_fraction * gpu.hbm_bytes_per_s

    def attention_rate(self, backend: str, head_dim: int) -> float:
        """Forward + backward FLOP/s of ``backend`` at ``head_dim`` (flash's where the backend is not tabulated)."""
        table = self.rates.attention_flops
        return nearest_rate(table.get(backend) or table["flash"], head_dim)

    def op_seconds(self, func, args, flops: int, moved: int) -> Tuple[str, float]:
        """(category, seconds) of one device op.

        Args:
            func: the aten overload dispatched.
            args: its positional arguments (attention ops: the query gives the head size).
            flops: its FLOPs as the tracker counts them (:func:`~longtrain.plan.flops.op_flops`).
            moved: bytes it reads and writes.

        Returns:
            ``("matmul" | "attention" | "memory", seconds)``.
        """
        packet = func._overloadpacket
        if packet in FREE_OPS:
            return "memory", 0.0
        memory = moved / self._hbm
        kind = ATTENTION_OPS.get(packet)
        if kind is not None:
            backend, backward = kind
            query = args[1] if backward else args[0]
            compute = flops * (BACKWARD_WORK if backward else 1.0) / self.attention_rate(backend, query.shape[-1])
            return "attention", max(compute, memory)
        if flops:
            return "matmul", max(flops / self.rates.matmul_flops + self.rates.matmul_ramp_s, memory)
        return "memory", memory

    def copy_seconds(self, nbytes: int) -> float:
        """A host <-> device copy of ``nbytes`` (one direction)."""
        return nbytes / self.rates.host_link_bytes_per_s

    def host_seconds(self, nbytes: int) -> float:
        """An op wholly in host memory moving ``nbytes``."""
        return nbytes / self.rates.host_memory_bytes_per_s

    def host_optimizer_seconds(self, state_bytes: int) -> float:
        """A host AdamW step over ``state_bytes`` of fp32 state (:data:`HOST_OPTIMIZER_TRAFFIC`)."""
        return self.host_seconds(int(state_bytes * HOST_OPTIMIZER_TRAFFIC))

    def describe(self) -> str:
        """The figures in use, one line."""
        r, gpu = self.rates, self.gpu
        flash = ", ".join(f"{rate / 1e12:.0f} at d{dim}" for dim, rate in sorted(r.attention_flops["flash"].items()))
        return (f"matmul {r.matmul_flops / 1e12:.0f} TFLOP/s (+{r.matmul_ramp_s * 1e6:.1f} us per GEMM), flash attention "
                f"fwd+bwd {flash} TFLOP/s, HBM {r.hbm_fraction:.0%} of {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, "
                f"host link {r.host_link_bytes_per_s / 1e9:.0f} GB/s, host memory {r.host_memory_bytes_per_s / 1e9:.0f} GB/s "
                f"[{r.source}]")


@dataclass
class TimeBreakdown:
    """What one step's time is made of (:meth:`Timeline.breakdown`)."""

    seconds: Dict[str, float]
    """Per :data:`CATEGORIES`, overlap applied; they add up to :attr:`overlap_s`."""
    host_copy_s: float
    """Every host copy, overlapped or not."""
    serial_s: float
    """Nothing overlapped: device work, every host copy, the host optimizer and communication."""
    overlap_s: float
    """Copies and communication overlapped as the module docstring says."""
    bound_by: str
    """The largest category."""


@dataclass
class Timeline:
    """The clock's seconds of one step, per category, with the host copies' phase windows."""

    seconds: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    host_copy_s: float = 0.0
    _phase: Optional[str] = None
    _device: float = 0.0  # device work of the open window
    _to_host: float = 0.0  # device-to-host copies of the open window (side stream)

    def _enter(self, phase: str) -> None:
        if phase != self._phase:
            self.close()
            self._phase = phase

    def close(self) -> None:
        """Close the open phase window: its device-to-host copies are exposed where they outlast its
        device work (a new window opens with the next phase's first op)."""
        self.seconds["host_copy_exposed"] += max(0.0, self._to_host - self._device)
        self._device = self._to_host = 0.0

    def device(self, phase: str, category: str, seconds: float) -> None:
        """Device work of ``phase``."""
        self._enter(phase)
        self.seconds[category] += seconds
        self._device += seconds

    def copy(self, phase: str, to_host: bool, seconds: float) -> None:
        """A host copy of ``phase``: device-to-host (overlaps its window) or host-to-device (exposed)."""
        self._enter(phase)
        self.host_copy_s += seconds
        if to_host:
            self._to_host += seconds
        else:
            self.seconds["host_copy_exposed"] += seconds

    def host(self, seconds: float) -> None:
        """Host work (the host optimizer's step, ops wholly in host memory): exposed."""
        self.seconds["host_optimizer"] += seconds

    def breakdown(self, comm_s: float) -> TimeBreakdown:
        """The step's time with ``comm_s`` seconds of communication (module docstring's overlap)."""
        self.close()
        return combine(self.seconds, self.host_copy_s, comm_s)


def combine(seconds: Dict[str, float], host_copy_s: float, comm_s: float) -> TimeBreakdown:
    """The step's time from the seconds of each summed category (``comm_exposed``, if present, is
    recomputed), all host copies' seconds and ``comm_s`` seconds of communication: what overlaps
    (module docstring). The planner's depth extension (longtrain/plan/depth.py) extends the sums and
    calls this again."""
    seconds = {c: v for c, v in seconds.items() if c != "comm_exposed"}
    device = sum(seconds[c] for c in DEVICE_CATEGORIES)
    local = device + seconds["host_copy_exposed"]
    seconds["comm_exposed"] = max(0.0, comm_s - local)
    serial = device + host_copy_s + seconds["host_optimizer"] + comm_s
    overlap = sum(seconds.values())
    bound_by = max(CATEGORIES, key=lambda c: seconds[c]) if overlap > 0 else ""
    return TimeBreakdown(seconds, host_copy_s, serial, overlap, bound_by)


__all__ = ["ATTENTION_OPS", "BACKWARD_WORK", "CATEGORIES", "Clock", "HOST_OPTIMIZER_TRAFFIC", "TimeBreakdown",
           "Timeline", "combine", "nearest_rate"]
