"""The plan of one training step on one rank: what it holds and costs (:func:`~longtrain.plan.step.run_step`
makes it; :mod:`longtrain.plan.depth` and :mod:`longtrain.plan.length` extend it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from longtrain.plan.tracker import START_KEY


@dataclass
class StepPlan:
    """What one training step holds and costs on one rank (bytes, FLOPs, seconds).

    ``tokens`` are the tokens of one data-parallel replica's step (whole sequences); the rank holds
    ``tokens / sp`` of them. ``tokens_per_s`` is the whole job's (``dp`` replicas), ``mfu`` the
    trainer's definition per GPU.
    """

    seq_len: int
    tokens: int
    precision: str
    peak_bytes: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_at_peak: int
    activations_kept: int
    largest_transient: int
    host_bytes: int
    """Peak of host memory under offload (layer inputs, ZeRO's optimizer partitions)."""
    peak_phase: str
    flops: int
    formula_flops: float
    world_size: int = 1
    layout: str = "dp=1 x ring=1 x ulysses=1"
    sp: int = 1
    time_s: float = 0.0
    """The clock's step time (:mod:`longtrain.plan.clock`), copies and communication overlapped
    (``time_overlap_s``)."""
    compute_s: float = 0.0
    """Datasheet roofline: the ops' compute terms at the dense bf16 peak."""
    memory_s: float = 0.0
    """Datasheet roofline: the ops' memory terms at the datasheet HBM bandwidth."""
    roofline_s: float = 0.0
    """The ops' datasheet roofline time alone (sum of max(compute, memory); no communication): a
    bound no run reaches, kept for comparison with the clock."""
    comm_s: float = 0.0
    """Every collective's bandwidth time, one after the other."""
    time_serial_s: float = 0.0
    """The clock with nothing overlapped: device work + every host copy + host optimizer + communication."""
    time_overlap_s: float = 0.0
    """The clock with host copies and communication overlapped as :mod:`longtrain.plan.clock` models it."""
    time_breakdown: Dict[str, float] = field(default_factory=dict)
    """Seconds of ``time_s`` per category (:data:`longtrain.plan.clock.CATEGORIES`: matmul, attention,
    memory, host_copy_exposed, host_optimizer, comm_exposed); they add up to ``time_s``."""
    bound_by: str = ""
    """The largest category of ``time_breakdown``: what bounds the step."""
    host_copy_s: float = 0.0
    """Every host <-> device copy of the step (offloaded layer inputs, ZeRO-Offload), overlapped or not."""
    clock: str = ""
    """The achieved rates the clock used and their source."""
    comm_bytes: int = 0
    comm: List[dict] = field(default_factory=list)
    """Per (axis, kind) of collective: count, bytes sent by this rank, link, time."""
    comm_by_phase: Dict[str, int] = field(default_factory=dict)
    interconnect: str = ""
    tokens_per_s: float = 0.0
    tokens_per_s_serial: float = 0.0
    mfu: float = 0.0
    streambp_chunk: Optional[int] = None
    buffers_bytes: int = 0
    """At the peak: engine and communication buffers, i.e. storages that are not parameters,
    gradients or optimizer state and either were alive before the step (the engine's buckets,
    model buffers such as RoPE tables) or were read or written by a collective (reduce buckets,
    Ulysses' all-to-all receive buffers)."""
    peak_tensors: List[dict] = field(default_factory=list)
    """The largest storages alive at the peak (:data:`~longtrain.plan.split.PEAK_TENSORS`): bytes, kind (params, grads,
    optimizer, buffers, other), the op that made them, shape, dtype and the phase it ran in."""
    extra: Dict[str, float] = field(default_factory=dict)
    host_pinned_bytes: int = 0
    """Peak of the page-locked part of the host memory (offloaded layer inputs, DeepSpeed's pinned
    buffers); the rest of :attr:`host_bytes` is pageable (a host optimizer's state)."""
    peak_by_key: Dict[str, int] = field(default_factory=dict)
    """Device bytes alive at every local peak, by ``"phase:op"`` (the tracker's); the plan's peak is
    their maximum. How :mod:`longtrain.plan.depth` extends the peak to a deeper model."""
    kinds_by_key: Dict[str, Dict[str, int]] = field(default_factory=dict, repr=False)
    """The device bytes of every local peak of :attr:`peak_by_key` by kind (``params``, ``grads``,
    ``optimizer``, ``buffers``, ``other``: :data:`~longtrain.plan.split.KINDS`): the split of the
    peak wherever a longer step's peak moves to (:mod:`longtrain.plan.length`)."""
    largest_by_key: Dict[str, int] = field(default_factory=dict)
    """The largest single transient storage (or op workspace) by ``"phase:op"`` that made it;
    :attr:`largest_transient` is their maximum (extended by key as :attr:`peak_by_key` is; along the
    sequence a lower bound where an op's output that grows with the length stays below another
    output of the same op at every probe: :mod:`longtrain.plan.length`)."""
    depth_probes: Optional[List[int]] = None
    """The depths whose plans were extended to the model's (:mod:`longtrain.plan.depth`); None:
    every layer was planned."""
    seq_probes: Optional[List[int]] = None
    """The sequence lengths whose plans were extended to this one (:mod:`longtrain.plan.length`);
    None: planned at its own length."""

    @property
    def start_bytes(self) -> int:
        """Device bytes alive when the step starts: parameters, optimizer state, the engine's and the
        model's buffers. The memory features (checkpointing, StreamBP, offload) do not change them."""
        return self.peak_by_key.get(START_KEY, 0)

    @property
    def bytes_per_token(self) -> float:
        """Device bytes per token of context this rank holds (its ``tokens / sp``)."""
        return self.peak_bytes * self.sp / max(self.tokens, 1)


__all__ = ["StepPlan"]
