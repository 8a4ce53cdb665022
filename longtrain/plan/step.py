"""One training step of longtrain's own code path, run under :class:`~longtrain.plan.tracker.StepTracker`.

:func:`run_step` builds what the trainer builds (``build_model_args``, ``build_model``,
``build_optimizer``, ``parallelize`` with the real config, so checkpointing, StreamBP and offload
are the training ones) and drives the step engine as :mod:`longtrain.trainer.step` does: per
micro-batch ``engine.forward(batch, chunked_lm_loss head)`` and ``engine.backward(loss)``, then
``engine.step(loss)`` (clip and ``optimizer.step()``). With ``fake=True`` every floating tensor is a
:class:`~torch._subclasses.fake_tensor.FakeTensor` (no memory, no compute); with ``fake=False`` the
same step runs for real, which is how the tests check the plan.

Layouts of several ranks (sequence parallelism, data parallelism) run as rank 0 of a fake process
world (:mod:`longtrain.plan.world`): the process groups are the real ones, the collectives move
nothing and are counted (:mod:`longtrain.plan.comm`); the batch is cut to rank 0's part of each
sequence as training cuts it.

Everything is built under the tracker, so every storage alive in the step is counted: the model,
the optimizer, and the engine's own buffers (DeepSpeed's flat parameter groups, reduce buckets and
partitions under ZeRO 1/2/3, which runs DeepSpeed's own code in the fake world). The step measured
is a steady-state one: the optimizer state exists before it starts (AdamW creates it lazily in
its first step): the engine primes it (``StepEngine.prime_optimizer``), or, where it cannot
(DeepSpeed), one whole step runs first and the tracker's peak, FLOPs and collectives restart after
it (a short one, about :data:`WARM_UP_TOKENS` per sequence). Each row is
one document (``doc_ids`` all 0).

Precision and kernels: the tensors live on the CPU (this torch build cannot fake CUDA tensors: the
first matmul on a fake CUDA tensor aborts in the CUDA device guard), so a GPU target is planned as
training on CUDA would run, in ``trainer.precision`` resolved for CUDA (``auto``: bf16 autocast on
the plain engine, DeepSpeed's bf16 mode under ZeRO), through CPU autocast, with CUDA's attention
kernels: the planner hands :func:`~longtrain.parallel.parallelize.parallelize` an
:class:`~longtrain.kernels.dispatch.AttentionKernels` that runs the flash varlen executor on its fake
CPU tensors (the ops' shape functions run on any device), for every attention caller (local
attention, StreamBP's chunks, ring blocks) as training on CUDA with ``flash`` runs them; the tracker
adds the CUDA backward's workspace. Offload to host
memory under a GPU target is modelled by :class:`~longtrain.plan.fakes.PlannedHostCopy` (layer inputs) and by marking
ZeRO's offloaded optimizer partitions as host memory; without a target (CPU) the real ``HostCopy``
keeps the tensor as is.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import gc
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from typing import Callable, Optional, Tuple

import torch

from longtrain.config import Config
from longtrain.kernels.dispatch import AttentionKernels
from longtrain.memory import auto_chunk_size
from longtrain.optim.loss import IGNORE_INDEX
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.sharding import shard_batch
from longtrain.parallel.state_memory import state_tensors
from longtrain.parallel.zero import process_state_kept
from longtrain.plan.clock import Clock, TimeBreakdown, combine
from longtrain.plan.comm import Interconnect, by_phase, parse_interconnect, summarise
from longtrain.plan.fakes import HostAdamStandIn, PlannedHostCopy, local_rank, zero_offload_on_host
from longtrain.plan.gpus import Gpu
from longtrain.plan.micro import MiddleMarks, planned_micro_batches
from longtrain.plan.split import KINDS, PEAK_TENSORS, StepKinds, split
from longtrain.plan.stepplan import StepPlan
from longtrain.plan.tracker import StepTracker
from longtrain.plan.world import fake_world
from longtrain.trainer.build import Seams, build_model_args, build_run, layout_run
from longtrain.trainer.step import micro_batches


def _config_for_target(cfg: Config, args, on_gpu: bool, bf16: bool, memory_bytes: Optional[int]) -> Config:
    """``cfg`` with ``memory.streambp.chunk_size=auto`` resolved as training on the target would:
    from the device memory left after the parameters (CPU: the default)."""
    cfg = copy.deepcopy(cfg)
    sc = cfg.memory.streambp
    if sc.enabled and sc.chunk_size == "auto":
        elem = 2 if bf16 else 4
        free = None
        if on_gpu and memory_bytes:
            free = max(0, memory_bytes - args.num_params() * 4)
        sc.chunk_size = auto_chunk_size(args, cfg.data.seq_len, cfg.data.micro_batch_size, free, elem_bytes=elem)
    return cfg


def long_chunk(cfg: Config, gpu: Optional[Gpu], bf16: bool, seq_len: int) -> Optional[int]:
    """StreamBP's chunk (tokens of a rank's slice) at ``seq_len`` tokens, which ``auto`` does not cap
    at the sequence when it is long enough (None without StreamBP)."""
    if not cfg.memory.streambp.enabled:
        return None
    cfg = copy.deepcopy(cfg)
    cfg.data.seq_len = seq_len
    chunk = _config_for_target(cfg, build_model_args(cfg.model), gpu is not None, bf16,
                               gpu.memory_bytes if gpu else None).memory.streambp.chunk_size
    return int(chunk)


def _world(stack: ExitStack, fake: bool, world_size: int, zero: bool) -> int:
    """Enter the process world of the plan; returns its size. A fake plan of several ranks (or of
    one under ZeRO, whose engine needs a process group) runs in a
    :func:`~longtrain.plan.world.fake_world`; a real one uses the initialised process group."""
    import torch.distributed as dist

    if not fake:
        return dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1 or zero:
        stack.enter_context(fake_world(world_size))
        stack.enter_context(local_rank(0))
    return world_size


WARM_UP_TOKENS = 1024
"""Tokens per sequence of the warm-up step (module docstring), rounded to a length the layout can cut."""


def _warm_up_len(cfg: Config, dims: ParallelDims) -> int:
    """The warm-up step's sequence length: short (it only has to create the optimizer state and the
    engine's buffers), a multiple of the layout's unit (Ulysses x 2 ring)."""
    unit = dims.seq_len_unit
    return min(cfg.data.seq_len, max(WARM_UP_TOKENS // unit, 1) * unit)


def _batches(cfg: Config, args, dims: ParallelDims, grad_accum: int, seq: Optional[int] = None) -> Tuple[list, int]:
    """This rank's micro-batches (whole sequences of ``seq`` tokens, default ``data.seq_len``, one
    document per row, cut as training cuts them) and the step's count of valid labels over every
    rank (as the trainer's all-reduce gives it)."""
    seq, mb = seq or cfg.data.seq_len, cfg.data.micro_batch_size
    g = torch.Generator().manual_seed(cfg.trainer.seed)
    batches = []
    for _ in range(grad_accum):
        ids = torch.randint(0, args.vocab_size, (mb, seq + 1), generator=g)
        whole = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                 "position_ids": torch.arange(seq).expand(mb, seq).contiguous(),
                 "doc_ids": torch.zeros(mb, seq, dtype=torch.long)}
        batches.append(shard_batch(whole, dims))
    num_valid = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) * dims.size("dp_sp")
    return batches, num_valid


def run_step(cfg: Config, gpu: Optional[Gpu] = None, fake: bool = True, world_size: int = 1,
             net: Optional[Interconnect] = None, num_layers: Optional[int] = None,
             every_micro_batch: bool = False, listed: int = PEAK_TENSORS) -> StepPlan:
    """Run one training step of ``cfg`` as rank 0 of ``world_size`` ranks and return its plan.

    Args:
        cfg: the validated config (as training gets it).
        gpu: the target device (bf16 where ``trainer.precision`` resolves so on CUDA; roofline);
            None: plan for the CPU as the step runs here.
        fake: fake tensors in a fake process world (plan) or real ones in the initialised process
            group (measurement; ``world_size`` is then the group's).
        world_size: ranks of the layout (``dp x parallel.sp.ulysses x parallel.sp.ring``).
        net: the cluster's links (None: the GPU's defaults, :data:`~longtrain.plan.comm.DEFAULT_INTERCONNECT`).
        num_layers: build the model with this many of its decoder layers (the first ones; the layout
            is checked for the whole model): a probe of :mod:`longtrain.plan.depth`.
        every_micro_batch: plan every micro-batch of a fake step (else three of a longer one and the
            middle one repeated: :mod:`longtrain.plan.micro`); a real step runs every one.
        listed: how many of the largest tensors alive at the peak the plan lists.
    """
    with ExitStack() as stack:
        stack.enter_context(process_state_kept())  # one plan's engine must not change the next plan's step
        stack.enter_context(_collector_on_new_objects())
        world_size = _world(stack, fake, world_size, cfg.zero.stage > 0)
        target = torch.device("cuda") if gpu is not None else torch.device("cpu")
        layout = layout_run(cfg, world_size, target)  # the trainer's checks and process groups
        # StreamBP's automatic chunk from the whole model's parameters: a probe's chunk is the model's
        cfg = _config_for_target(cfg, layout.args, gpu is not None, layout.bf16, gpu.memory_bytes if gpu else None)
        if num_layers is not None:
            layout.args = dataclasses.replace(layout.args, num_layers=num_layers)
        dims, args = layout.dims, layout.args
        tracker = StepTracker(gpu.bf16_flops if gpu else 0.0, gpu.hbm_bytes_per_s if gpu else 0.0, fake=fake,
                              clock=Clock(gpu) if gpu else None)
        batches, num_valid = _batches(cfg, args, dims, layout.grad_accum)
        warm_up = functools.partial(_batches, cfg, args, dims, 1, _warm_up_len(cfg, dims))  # made if needed
        seams = Seams(load_weights=False, optimizer_device=target)
        if gpu is not None:  # CUDA's attention executors (flash varlen) on the fake CPU tensors, as on the GPU
            seams.kernels = AttentionKernels("flash", cuda_device_types=("cuda", "cpu"))
            if cfg.memory.offload_checkpoints:
                seams.host_copy = functools.partial(PlannedHostCopy, tracker=tracker)
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            offloads = [name for name, on in (("offload_optimizer", cfg.zero.offload_optimizer),
                                              ("offload_param", cfg.zero.offload_params)) if on == "cpu"]
            if cfg.zero.stage > 0 and offloads:  # host memory only when the target has a device
                mark = tracker.mark_host if gpu is not None else (lambda t: None)
                cfg.zero.extra = stack.enter_context(zero_offload_on_host(cfg.zero.extra, offloads, mark))
                seams.host_optimizer = HostAdamStandIn
        plan = _tracked_step(cfg, layout, batches, num_valid, tracker, seams, warm_up, every_micro_batch or not fake,
                             listed)
        _add_time(plan, tracker, dims, gpu, net)
        return plan


@contextmanager
def _collector_on_new_objects():
    """The garbage collector looks only at objects made in the block: those alive before it (the
    imports, a sweep worker's earlier plans) are frozen out of its generations until the block
    ends. DeepSpeed's optimizers call ``gc.collect()`` themselves as they build (its memory report,
    forced), and the plan once more after the backward; over the half million objects a planner
    process holds that was a quarter of a plan's time. What the step makes is collected as before
    (what was frozen was alive before the step began, so the tracker never counted it)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Phases:
    """The planner's view of the micro-batch loop: the tracker's phase, the bytes the first forward
    made that are still alive after it (kept for its backward; not the engine's buffers), and the
    sums around a middle micro-batch when the step is shortened (``middle``)."""

    def __init__(self, tracker: StepTracker, middle: Optional[MiddleMarks] = None) -> None:
        self.tracker, self.kept, self._before, self.middle = tracker, None, 0, middle

    def before_forward(self, index: int) -> None:
        self.tracker.phase = "forward"
        self._before = self.tracker.serial
        if self.middle is not None:
            self.middle.before_forward(index)

    def after_forward(self, index: int) -> None:
        t = self.tracker
        if self.kept is None:
            self.kept = sum(t.size_of(k) for k in t.alive() - t.buffer_serials if k > self._before)
        t.phase = "backward"


def _optimizer_step(engine, balancer, tracker: StepTracker) -> None:
    tracker.phase = "optimizer"
    engine.step(1.0)
    if balancer is not None:
        balancer.end_step()


def _tracked_step(cfg: Config, layout, batches: list, num_valid: int, tracker: StepTracker, seams: Seams,
                  warm_up: Callable[[], Tuple[list, int]], every_micro_batch: bool,
                  listed: int = PEAK_TENSORS) -> StepPlan:
    """Build the run as the trainer does (:func:`~longtrain.trainer.build.build_run`, with the plan's
    seams) and run one step of its micro-batch loop under ``tracker`` (every micro-batch, or three
    and the middle one repeated: :mod:`longtrain.plan.micro`).

    Everything is built under the tracker, so every storage the step finds alive (parameters,
    optimizer state, the engine's buffers) is counted. The optimizer state of a steady-state step
    exists before it: the engine primes it, or (ZeRO) one whole step runs first; then the
    tracker's peak, FLOPs and collectives restart and the measured step runs.
    """
    on_gpu = seams.optimizer_device.type == "cuda"
    args, dims, precision = layout.args, layout.dims, layout.precision
    with tracker:
        # the model is made on the CPU (the fake tensors' device), without model.hf_path's weights
        run = build_run(cfg, layout, torch.device("cpu"), seams)
        model, optimizer, engine, balancer = run.model, run.optimizer, run.engine, run.balancer
        if not engine.prime_optimizer():  # steady state (docstring)
            # training has no warm-up batch: made here, it is not alive in the step
            micro_batches(engine, balancer, *warm_up(), cfg.trainer.loss_chunk_size, _Phases(tracker))
            _optimizer_step(engine, balancer, tracker)
        params, optim = state_tensors(model, optimizer)
        host_optim = optim if on_gpu and cfg.zero.stage > 0 and cfg.zero.offload_optimizer == "cpu" else []
        if on_gpu and cfg.zero.stage > 0:  # ZeRO-Offload: the host optimizer's state (the rest is pinned)
            for t in host_optim + (params if cfg.zero.offload_params == "cpu" else []):
                tracker.mark_host(t, pinned=False)
        tracker.phase = "forward"
        tracker.buffer_probe = engine.buffer_tensors
        tracker.start_step()
        inputs = [tensor for batch in batches for tensor in batch.values()]
        for tensor in inputs:  # the trainer moves all of a step's micro-batches to the device first
            tracker.track(tensor)
        # a balancer counts the step's micro-batches: plan every one
        planned = planned_micro_batches(batches, every_micro_batch or balancer is not None)
        middle = MiddleMarks(tracker, len(planned), len(batches))
        phases = _Phases(tracker, middle)
        micro_batches(engine, balancer, planned, num_valid, cfg.trainer.loss_chunk_size, phases)
        planned_micro = middle.finish()
        kept = phases.kept or 0
        # what only a reference cycle keeps (the autograd graph of a checkpointed layer) dies at the
        # collector's whim, which would make "alive after the backward" differ from run to run
        gc.collect()
        buffer_keys = tracker.buffer_serials
        input_keys = tracker.serials(inputs)  # the step's data: neither gradients nor buffers
        states = tracker.serials(params) | tracker.serials(optim) | buffer_keys | input_keys
        grad_keys = {s for s in tracker.alive() if s > tracker.step_start} - states
        grads_bytes = sum(tracker.size_of(s) for s in grad_keys)
        _optimizer_step(engine, balancer, tracker)
        tracker.host_optimizer_step(sum(tracker.size_of(s) for s in tracker.serials(host_optim)))
        param_keys, state_keys = tracker.serials(params), tracker.serials(optim)
        params_bytes = sum(tracker.size_of(s) for s in param_keys)
        optimizer_bytes = sum(tracker.size_of(s) for s in state_keys)
    kinds = StepKinds(param_keys, grad_keys, state_keys, buffer_keys, input_keys, tracker.step_start,
                      tracker.comm_serials)
    cats, peak_tensors = split(tracker, kinds, tracker.peak_snapshot, tracker.peak_phase, listed)
    kinds_by_key = tracker.bytes_at_keys(kinds.of)
    largest_by_key, held = {"workspace": tracker.workspace_peak}, grad_keys | buffer_keys
    for serial, size in tracker.allocations:
        if serial not in held:
            op, _, _, phase = tracker.origin[serial]
            key = f"{phase}:{op}"
            largest_by_key[key] = max(largest_by_key.get(key, 0), size)
    largest = max(largest_by_key.values())
    seq = cfg.data.seq_len
    tokens = cfg.data.micro_batch_size * seq * layout.grad_accum
    plan = StepPlan(seq_len=seq, tokens=tokens, precision=precision, peak_bytes=tracker.peak,
                    params_bytes=params_bytes, grads_bytes=grads_bytes, optimizer_bytes=optimizer_bytes,
                    activations_at_peak=cats["other"], activations_kept=kept, largest_transient=largest,
                    host_bytes=tracker.host_peak, peak_phase=tracker.peak_phase, flops=tracker.flops,
                    formula_flops=args.flops_per_token(seq) * tokens, world_size=dims.world_size,
                    layout=dims.describe(), sp=dims.sp, buffers_bytes=cats["buffers"],
                    streambp_chunk=cfg.memory.streambp.chunk_size if cfg.memory.streambp.enabled else None)
    plan.extra = {f"peak_{k}": v for k, v in cats.items()}
    if planned_micro is not None:
        plan.extra["planned_micro_batches"] = float(planned_micro)
    plan.peak_by_key = dict(tracker.peak_by_key)
    plan.kinds_by_key = {key: {kind: by_kind.get(kind, 0) for kind in KINDS} for key, by_kind in kinds_by_key.items()}
    plan.largest_by_key = largest_by_key
    plan.host_pinned_bytes = tracker.pinned_peak
    plan.peak_tensors = peak_tensors
    return plan


def axis_namer(dims: ParallelDims, rank: int = 0):
    """``ranks -> axis name`` for the groups of ``dims`` seen from ``rank`` (the narrowest axis first)."""
    known = [(tuple(dims.group_ranks(axis, rank)), axis) for axis in ("ulysses", "ring", "sp", "dp", "dp_sp")]

    def name(ranks) -> str:
        ranks = tuple(sorted(ranks))
        return next((axis for group, axis in known if tuple(sorted(group)) == ranks), f"ranks {list(ranks)}")

    return name


def _add_time(plan: StepPlan, tracker: StepTracker, dims: ParallelDims, gpu: Optional[Gpu],
              net: Optional[Interconnect]) -> None:
    """Communication rows, and (for a GPU target) the clock's time with its breakdown, the datasheet
    roofline, tokens/s and MFU."""
    net = net or parse_interconnect(None, gpu.name if gpu else "h100")
    rows = summarise(tracker.collectives, axis_namer(dims), net)
    plan.comm = [asdict(r) for r in rows]
    plan.comm_bytes = sum(r.bytes_sent for r in rows)
    plan.comm_by_phase = by_phase(tracker.collectives)
    plan.interconnect = net.describe()
    if gpu is None:
        return
    plan.roofline_s, plan.compute_s, plan.memory_s = tracker.time_s, tracker.compute_s, tracker.memory_s
    plan.comm_s = sum(r.time_s for r in rows)
    derive_totals(plan, dims.dp, gpu, tracker.timeline.breakdown(plan.comm_s))
    plan.clock = tracker.clock.describe()


DERIVED = ("time_serial_s", "time_overlap_s", "time_s", "tokens_per_s", "tokens_per_s_serial", "mfu", "bound_by")
"""The fields of a plan :func:`derive_totals` computes from the others (not sums over ops); so is
``time_breakdown["comm_exposed"]``."""


def derive_totals(plan: StepPlan, dp: int, gpu: Gpu, clock: Optional[TimeBreakdown] = None) -> None:
    """The step time with and without overlap and what bounds it (``clock``: the clock's breakdown;
    None: recombined from the plan's own sums), the job's tokens/s and the MFU."""
    clock = clock or combine(plan.time_breakdown, plan.host_copy_s, plan.comm_s)
    plan.time_serial_s, plan.time_overlap_s, plan.host_copy_s = clock.serial_s, clock.overlap_s, clock.host_copy_s
    plan.time_breakdown, plan.bound_by = clock.seconds, clock.bound_by
    plan.time_s = plan.time_overlap_s
    job_tokens = plan.tokens * dp
    if plan.time_s:
        plan.tokens_per_s = job_tokens / plan.time_s
        plan.tokens_per_s_serial = job_tokens / plan.time_serial_s
        plan.mfu = plan.formula_flops / plan.time_s / (plan.sp * gpu.bf16_flops)
