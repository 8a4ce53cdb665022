"""``longtrain-plan`` / ``python -m longtrain.plan``: plan one training step of a recipe on a target GPU.

    longtrain-plan [--config-name RECIPE] [--config-dir DIR] [key=value ...]
                   [--gpu h100|h200|a100|b200] [--calibration FILE] [--world-size N]
                   [--interconnect intra=GBps,inter=GBps] [--json] [--max-seq] [--sweep [--jobs N]]
                   [--exact]

The recipe and overrides are composed and checked exactly as ``longtrain-train`` does
(:func:`longtrain.precheck.precheck`, :func:`longtrain.precheck.compose_config`). The plan is rank 0's
of ``--world-size`` ranks (a table, or one JSON object with ``--json``); ``--max-seq`` adds the
longest ``data.seq_len`` that fits the GPU (a search over multiples of :data:`SEQ_MULTIPLE`);
``--sweep`` plans every layout of the world size instead (:mod:`longtrain.plan.sweep`), in
``--jobs`` processes (default: one per CPU, at most 8). ``--calibration FILE`` replaces the clock's
table of achieved rates with measured ones (:mod:`longtrain.plan.calibration`: the GPU suite's
``gpu_suite.json`` or a small JSON of one's own). Bad input ends with one ``longtrain: error: ...``
line and exit code 2, as in training. ``--exact`` plans every layer and every micro-batch
(:mod:`longtrain.plan.depth`, :mod:`longtrain.plan.micro`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

from longtrain.config import Config, ConfigError, register_configs
from longtrain.plan.calibration import calibrated
from longtrain.plan.comm import Interconnect, parse_interconnect
from longtrain.plan.gpus import GPUS, Gpu, get_gpu
from longtrain.plan.length import Probes, plan_step, seq_unit, with_chunk, with_seq
from longtrain.plan.step import StepPlan, long_chunk
from longtrain.plan.sweep import LIBRARY_LOGGERS, SweepRow, format_sweep, layout_config, sweep
from longtrain.errors import FULL_ERROR_ENV, error_boundary
from longtrain.precheck import compose_config, precheck

SEQ_MULTIPLE = 256
"""``--max-seq`` searches multiples of this many tokens (the StreamBP auto chunk's granule)."""
MAX_SEQ_LIMIT = 1 << 24
"""``--max-seq`` looks no further than this (16M tokens)."""
SEQ_TOLERANCE = 0.01
"""``--max-seq`` stops when the longest length known to fit is within this fraction of the shortest
known not to (the plan itself is a prediction a few percent from a GPU's measurement)..."""
FILLED = 0.995
"""... or when it fills this much of the GPU (or of the host memory): memory grows about linearly
with the length, so a longer one that fits is at most about a percent longer."""
AIM = (1 + FILLED) / 2
"""Where ``--max-seq`` aims its extrapolations: between :data:`FILLED` and a full GPU, so that one
plan on the line ends the search when the line holds."""


def _split(argv: List[str]) -> Tuple[dict, List[str]]:
    """(the planner's own flags, the training command line)."""
    own = {"gpu": "h100", "world_size": "1", "interconnect": "", "calibration": "", "host_mem": "", "jobs": "",
           "json": False, "max_seq": False, "sweep": False, "exact": False}
    rest, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in ("--gpu", "--world-size", "--interconnect", "--calibration", "--host-mem", "--jobs"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            own[flag[2:].replace("-", "_")] = value
        elif argv[i] in ("--json", "--max-seq", "--sweep", "--exact"):
            own[argv[i][2:].replace("-", "_")] = True
        elif argv[i].startswith("-") and flag not in ("--config-name", "-cn", "--config-dir", "-cd"):
            raise ConfigError(f"{argv[i]}: not a flag of longtrain-plan (it takes --config-name, --config-dir, --gpu, "
                              "--calibration, --world-size, --interconnect, --host-mem, --json, --max-seq, --sweep, "
                              "--jobs, --exact and key=value overrides)")
        else:
            rest.append(argv[i])
        i += 1
    return own, rest


def _host_mem(gpu: Gpu, text: str) -> Gpu:
    """``gpu`` with ``--host-mem`` GiB of host memory per GPU (empty: the target's default)."""
    if not text:
        return gpu
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if gib <= 0:
        raise ConfigError(f"--host-mem: '{text}' is not a positive number of GiB (host memory per GPU, e.g. --host-mem 240)")
    return dataclasses.replace(gpu, host_memory_bytes=int(gib * 2**30))


def _positive(flag: str, text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{flag}: '{text}' is not a positive integer ({what})")
    return n


def _world_size(text: str) -> int:
    return _positive("--world-size", text, "the number of GPUs of the job, e.g. --world-size 8")


DEFAULT_JOBS_CAP = 8
"""``--jobs`` defaults to one process per CPU, at most this many (a worker planning an 8B model holds
about 1 GB of host memory)."""


def _jobs(own: dict) -> int:
    """``--jobs``: processes a sweep plans in (default one per CPU, at most :data:`DEFAULT_JOBS_CAP`);
    only with ``--sweep``."""
    if not own["jobs"]:
        return min(os.cpu_count() or 1, DEFAULT_JOBS_CAP)
    if not own["sweep"]:
        raise ConfigError(f"--jobs {own['jobs']}: only a --sweep plans in several processes; drop --jobs")
    return _positive("--jobs", own["jobs"], "the processes a sweep plans in, e.g. --jobs 4")


def max_seq(cfg: Config, gpu: Gpu, world_size: int = 1, net: Optional[Interconnect] = None, exact: bool = False
            ) -> Tuple[int, Optional[StepPlan]]:
    """The longest multiple of :data:`SEQ_MULTIPLE` whose step fits ``gpu``'s memory and its host
    memory (``gpu.load(plan)`` at most 1), and its plan ((0, None) when not even the shortest fits).

    Memory grows with the length, and beyond StreamBP's chunk and the loss chunk it grows almost
    linearly (what is kept per token is fixed), so the search plans two lengths past the chunk (2x
    and 4x the chunk StreamBP takes at long lengths, over the sequence-parallel ranks; 8K and 16K
    tokens without StreamBP), extrapolates their line to :data:`AIM` of the GPU (the search ends there
    when that length fills :data:`FILLED` of it and fits), and otherwise narrows the bracket
    [fits, does not fit] by interpolating between its ends (regula falsi, with a bisection whenever
    the same end moved twice running) until it is :data:`SEQ_TOLERANCE` of the length wide (at least
    :data:`SEQ_MULTIPLE`) or the fitting end fills :data:`FILLED` of the memory: a handful of plans
    instead of a doubling and a bisection. Each plan
    extends a few layers to the model's depth (:mod:`longtrain.plan.depth`) unless ``exact``, and
    under StreamBP a few shorter steps to its length (:mod:`longtrain.plan.length`): the search then
    first narrows the bracket to whole StreamBP units (a chunk on every rank; every such length
    shares one set of sequence probes), then to :data:`SEQ_MULTIPLE` (a set of probes per length).
    """
    seen: Dict[int, StepPlan] = {}
    cache: Probes = {}  # the sequence probes of each remainder, shared by every length
    unit = None if exact else seq_unit(with_chunk(with_seq(cfg, MAX_SEQ_LIMIT), gpu))
    granule = unit or SEQ_MULTIPLE

    def at(seq) -> float:
        if seq not in seen:
            seen[seq] = plan_step(with_seq(cfg, seq), gpu, world_size=world_size, net=net, exact=exact, probes=cache)
        return gpu.load(seen[seq])

    def down(x: float) -> int:
        return int(x) // granule * granule

    lo, hi = 0, None  # longest length known to fit, shortest known not to
    first = SEQ_MULTIPLE * 16
    at(first)  # below StreamBP's chunk the chunk grows with the length: probe past it, where the line holds
    span = (long_chunk(cfg, gpu, seen[first].precision == "bf16", MAX_SEQ_LIMIT) or 0) * (
        cfg.parallel.sp.ulysses * cfg.parallel.sp.ring)
    probes = (2 * first, 4 * first) if span < first else (down(2 * span + SEQ_MULTIPLE - 1), down(4 * span))
    for seq in (first, *probes):
        if at(seq) > 1:
            hi = seq
            break
        lo = max(lo, seq)
    if hi is None:  # extrapolate the line through the last two lengths that fit until one fills the GPU
        a, b = probes
        while hi is None and lo < MAX_SEQ_LIMIT and at(lo) < FILLED:
            slope = max(at(b) - at(a), 1e-12) / (b - a)
            # the line's length at AIM (just under a full GPU), and on
            guess = min(MAX_SEQ_LIMIT, max(down(b + (AIM - at(b)) / slope),
                                           lo + max(granule, down(SEQ_TOLERANCE * lo))))
            if at(guess) > 1:
                hi = guess
            else:
                a, b, lo = b, guess, guess
        if hi is None:
            return lo, seen[lo]
    if lo == 0:  # below the first probe: bisect down to SEQ_MULTIPLE
        granule = SEQ_MULTIPLE
        lo = SEQ_MULTIPLE if at(SEQ_MULTIPLE) <= 1 else 0
        if lo == 0:
            return 0, None
    for granule in dict.fromkeys((granule, SEQ_MULTIPLE)):  # whole StreamBP units first (module docstring)
        moved = None
        while hi - lo > max(granule, SEQ_TOLERANCE * lo) and at(lo) < FILLED:
            mid = down(lo + (1 - at(lo)) * (hi - lo) / max(at(hi) - at(lo), 1e-12))
            if moved == "twice":
                mid = down((lo + hi) // 2)
            mid = min(max(mid, lo + granule), hi - granule)
            side = "lo" if at(mid) <= 1 else "hi"
            moved = "twice" if side == moved else side
            lo, hi = (mid, hi) if side == "lo" else (lo, mid)
    return lo, seen[lo]


def _gib(x: float) -> str:
    return f"{x / 2**30:.3f} GiB"


def summary(cfg: Config, gpu: Gpu, plan: StepPlan, longest: Optional[int] = None) -> str:
    """One screen: whether it fits, the peak and its three biggest consumers, the host memory, the
    predicted speed and what bounds it."""
    fits = gpu.fits(plan)
    verdict = "FITS" if fits else "DOES NOT FIT"
    if not fits:
        verdict += (" (device memory)" if plan.peak_bytes > gpu.memory_bytes else " (host memory)")
    kinds = {"parameters": plan.extra.get("peak_params", plan.params_bytes),
             "gradients": plan.extra.get("peak_grads", plan.grads_bytes),
             "optimizer state": plan.extra.get("peak_optimizer", plan.optimizer_bytes),
             "buffers": plan.buffers_bytes, "activations and temporaries": plan.activations_at_peak}
    top = sorted(kinds.items(), key=lambda kv: kv[1], reverse=True)[:3]
    depth = (f"; {cfg.model.num_layers or 'all'} layers extended from probes at depths {plan.depth_probes}"
             if plan.depth_probes else "")
    lines = [f"{verdict}: {cfg.model.name}, seq_len {plan.seq_len}, {plan.layout}, zero stage {cfg.zero.stage}, "
             f"{_features(cfg, plan)} on {gpu.name}{depth}",
             f"  peak device memory {_gib(plan.peak_bytes)} of {_gib(gpu.memory_bytes)} (during {plan.peak_phase}): "
             + ", ".join(f"{name} {_gib(b)}" for name, b in top),
             f"  host memory {_gib(plan.host_bytes)} of {_gib(gpu.host_memory_bytes)} per GPU "
             f"({_gib(plan.host_pinned_bytes)} pinned)"]
    if plan.time_s:
        lines.append(f"  predicted {plan.tokens_per_s:,.0f} tokens/s, MFU {plan.mfu * 100:.1f}%, "
                     f"step {plan.time_s:.3g} s, bound by {plan.bound_by}")
    if longest is not None:
        lines.append(f"  longest seq_len that fits (--max-seq): {longest}")
    return "\n".join(lines)


def sweep_summary(cfg: Config, gpu: Gpu, rows: List[SweepRow], seconds: float) -> str:
    """One screen before a sweep's table: how many layouts fit, and the :func:`summary` of the
    fastest that fits (of the one with the smallest peak when none does)."""
    planned = [r for r in rows if r.plan is not None]
    fitting = [r for r in planned if r.fits(gpu)]
    head = (f"{len(fitting)} of {len(rows)} layouts fit {gpu.name} ({len(planned)} planned, "
            f"{len(rows) - len(planned)} left out or refused; swept in {seconds:.0f} s)")
    if fitting:
        best, what = max(fitting, key=lambda r: r.plan.tokens_per_s), "the fastest"
    elif planned:
        best, what = min(planned, key=lambda r: r.plan.peak_bytes), "none fits; the smallest peak"
    else:
        return head
    layout = layout_config(cfg, best.ulysses, best.ring, best.zero_stage, best.memory)
    return f"{head}, {what}:\n" + summary(layout, gpu, best.plan)


def format_plan(cfg: Config, gpu: Gpu, plan: StepPlan, longest: Optional[int] = None) -> str:
    """The plan: the :func:`summary` first, then every detail as a table."""
    rows = [("recipe", f"model {cfg.model.name}, seq_len {plan.seq_len}, {plan.tokens} tokens per step and "
                       f"replica, {plan.precision}"),
            ("layout", f"{plan.layout} ({plan.world_size} ranks; the plan is rank 0's), zero stage {cfg.zero.stage}"),
            ("memory features", _features(cfg, plan)),
            ("target", f"{gpu.name}: {_gib(gpu.memory_bytes)}, {gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
                       f"{gpu.hbm_bytes_per_s / 1e12:.2f} TB/s"),
            ("peak device memory", f"{_gib(plan.peak_bytes)} ({'fits' if plan.peak_bytes <= gpu.memory_bytes else 'does NOT fit'}; "
                                   f"peak during {plan.peak_phase})"),
            ("  parameters", _gib(plan.params_bytes) + _on_host(cfg, cfg.zero.offload_params)),
            ("  gradients", _gib(plan.grads_bytes)),
            ("  optimizer state", _gib(plan.optimizer_bytes) + _on_host(cfg, cfg.zero.offload_optimizer)),
            ("  engine and communication buffers at the peak", _gib(plan.buffers_bytes)),
            ("  activations and temporaries at the peak", _gib(plan.activations_at_peak)),
            ("activations kept after the forward", _gib(plan.activations_kept)),
            ("largest single transient tensor", _gib(plan.largest_transient)),
            ("host memory (offload)", f"{_gib(plan.host_bytes)} ({_gib(plan.host_pinned_bytes)} pinned, the rest "
                                      f"pageable) of {_gib(gpu.host_memory_bytes)} per GPU (--host-mem)"),
            ("device bytes per token of context", f"{plan.bytes_per_token / 1024:.1f} KiB (of the {plan.tokens // plan.sp} "
                                                  "tokens this rank holds)"),
            ("FLOPs of the step (counted, this rank)", f"{plan.flops:.4g} (ModelArgs.flops_per_token x tokens of the "
                                                       f"replica: {plan.formula_flops:.4g})"),
            ("datasheet roofline", f"{plan.roofline_s * 1e3:.1f} ms (sum over ops of max(compute, memory) at the "
                                   f"datasheet peak; compute terms {plan.compute_s * 1e3:.1f} ms, memory terms "
                                   f"{plan.memory_s * 1e3:.1f} ms): a bound, not a prediction"),
            ("clock (achieved rates)", plan.clock),
            ("communication", f"{plan.comm_bytes / 1e9:.3f} GB sent by this rank, {plan.comm_s * 1e3:.1f} ms at "
                              f"{plan.interconnect}")]
    for c in plan.comm:
        rows.append((f"  {c['kind']} over {c['axis']} ({c['link']})",
                     f"{c['count']} x, {c['bytes_sent'] / 1e6:.1f} MB, {c['time_s'] * 1e3:.2f} ms"))
    rows += [("host copies (all, overlapped or not)", f"{plan.host_copy_s * 1e3:.1f} ms"),
             ("step time: no overlap / overlapped", f"{plan.time_serial_s * 1e3:.1f} ms / {plan.time_overlap_s * 1e3:.1f} ms"),
             ("  bound by (seconds per category, overlapped)", plan.bound_by)]
    rows += [(f"    {name}", f"{seconds * 1e3:.1f} ms ({seconds / plan.time_s:.0%})" if plan.time_s else "0")
             for name, seconds in plan.time_breakdown.items()]
    rows.append(("tokens/s of the job (overlap; no overlap), MFU", f"{plan.tokens_per_s:,.0f} "
                 f"({plan.tokens_per_s_serial:,.0f}), {plan.mfu * 100:.1f}%"))
    if longest is not None:
        rows.append(("longest seq_len that fits (--max-seq)", str(longest)))
    rows.append(("largest tensors alive at the peak", ""))
    for t in plan.peak_tensors:
        rows.append((f"  {_gib(t['bytes'])}", f"{t['kind']}: {t['op']} {tuple(t['shape'])} {t['dtype']} "
                                              f"(made in the {t['made_in']})"))
    width = max(len(k) for k, _ in rows)
    return summary(cfg, gpu, plan, longest) + "\n\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _on_host(cfg: Config, offload: str) -> str:
    return " (in host memory: ZeRO-Offload)" if cfg.zero.stage > 0 and offload == "cpu" else ""


def _features(cfg: Config, plan: StepPlan) -> str:
    mc = cfg.memory
    if mc.streambp.enabled:
        return f"StreamBP, chunk {plan.streambp_chunk}" + (", layer inputs offloaded" if mc.offload_checkpoints else "")
    return "activation checkpointing" if mc.checkpointing else "none"


def plan_main(argv: List[str]) -> int:
    """Run the planner's command line ``argv``; returns the exit code."""
    own, rest = _split(argv)
    gpu = _host_mem(calibrated(get_gpu(own["gpu"]), own["calibration"]), own["host_mem"])
    world_size = _world_size(own["world_size"])
    jobs = _jobs(own)
    net = parse_interconnect(own["interconnect"], gpu.name)
    if own["sweep"] and own["max_seq"]:
        raise ConfigError("--sweep and --max-seq: choose one (a sweep plans data.seq_len as given)")
    error = precheck(rest, world_size)
    if error is not None:
        raise ConfigError(error)
    cfg = compose_config(rest)
    with _quiet(), contextlib.redirect_stdout(sys.stderr):  # what libraries print while the step runs
        text = _planned(own, cfg, gpu, world_size, net, jobs)
    print(text)
    return 0


@contextlib.contextmanager
def _quiet():
    """The step's own log lines (longtrain's, DeepSpeed's) at WARNING for the block: they would
    interleave with the plan."""
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _planned(own: dict, cfg: Config, gpu: Gpu, world_size: int, net: Interconnect, jobs: int = 1) -> str:
    """The planner's answer to its flags ``own`` (a table, or JSON with ``--json``)."""
    if own["sweep"]:
        start = time.perf_counter()
        rows = sweep(cfg, gpu, world_size, net, exact=own["exact"], jobs=jobs)
        if own["json"]:
            return json.dumps({"gpu": dataclasses.asdict(gpu), "world_size": world_size,
                               "rows": [r.as_dict(gpu) for r in rows]})
        return sweep_summary(cfg, gpu, rows, time.perf_counter() - start) + "\n\n" + format_sweep(rows, gpu)
    longest = best = None
    if own["max_seq"]:
        longest, best = max_seq(cfg, gpu, world_size, net, exact=own["exact"])
        if best is None:
            raise ConfigError(f"not even data.seq_len={SEQ_MULTIPLE} fits {gpu.name} ({_gib(gpu.memory_bytes)}, "
                              f"{_gib(gpu.host_memory_bytes)} of host memory) with this layout; lower the model size "
                              "or turn on memory features")
    plan = plan_step(cfg, gpu, world_size=world_size, net=net, exact=own["exact"])
    if not own["json"]:
        return format_plan(cfg, gpu, plan, longest)
    out = {"gpu": dataclasses.asdict(gpu), "plan": dataclasses.asdict(plan), "fits": gpu.fits(plan)}
    if longest is not None:
        out["max_seq"] = longest
        out["max_seq_plan"] = dataclasses.asdict(best)
    return json.dumps(out)


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point (``longtrain-plan``): one ``longtrain: error:`` line and exit 2 on bad input."""
    register_configs()
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(FULL_ERROR_ENV) == "1":
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        with error_boundary():
            return plan_main(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1


__all__ = ["GPUS", "MAX_SEQ_LIMIT", "SEQ_MULTIPLE", "format_plan", "main", "max_seq", "plan_main", "with_seq"]
