"""``longtrain-plan --sweep``: plan every layout of a world size and rank those that fit by speed.

A layout is a choice of Ulysses and ring degrees (data parallelism takes the rest of the world),
a ZeRO stage, and a memory feature (none, activation checkpointing, StreamBP, StreamBP with the
layer inputs offloaded). Every layout the model and the sequence admit is planned with
:func:`~longtrain.plan.depth.plan_step`; one the code refuses (a head count Ulysses cannot split, a
sequence length the ring cannot cut) is listed with the
reason (ZeRO stages run DeepSpeed's own step in the fake world, two steps each: see
:mod:`longtrain.plan.step`). Rows that fit the GPU come first, fastest first (estimated tokens/s with communication
overlapped), then those left out because a faster feature of their layout fits, then the rest by
peak memory.

Four things keep a sweep short. A row is not planned when a memory feature of the same layout that
is at least as fast by construction fits (``faster_fits``, :data:`AT_LEAST_AS_FAST`): it could only
rank below that row. Nor when a feature of the same layout whose step holds no more does not fit
(``exceeds``, :data:`HOLDS_AT_MOST`): no memory feature holds every activation checkpointing holds
and more, so where checkpointing does not fit neither does it (at long context the costliest plans
of a sweep, and never the answer). What is alive when a step starts (the parameters, the optimizer
state, the engine's buffers: :attr:`~longtrain.plan.step.StepPlan.start_bytes`) depends on the model,
the world size and the ZeRO stage, not on the memory feature nor on how the ranks split into Ulysses,
ring and data parallelism (ZeRO shards over all of them; ``tests/unit/test_plan_sweep.py`` holds it
equal), so each (Ulysses, ring, ZeRO stage) group plans :data:`PLANNED_FIRST` alone, and when that
alone exceeds the GPU every row of that ZeRO stage not yet started is listed as not fitting with it
(``floor_bytes``) instead of planned. And the plans run in ``jobs``
worker processes (``longtrain-plan --sweep --jobs N``, default one per CPU, at most 8), each a fresh
interpreter; the rows are the same as one process's. A fresh interpreter imports the caller's
``__main__`` again, so a script that calls :func:`sweep` with ``jobs > 1`` keeps its work under
``if __name__ == "__main__":`` (the command line does). Each worker runs torch's ops on its share of
the CPUs (:func:`worker_threads`): with torch's default, a thread per CPU in every worker, the
workers' threads wait on one another and every plan ran about four times slower than alone.
"""
from __future__ import annotations

import concurrent.futures as futures
import copy
import dataclasses
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from longtrain.config import Config
from longtrain.models.args import divisors
from longtrain.plan.comm import Interconnect
from longtrain.plan.gpus import Gpu
from longtrain.plan.length import plan_step
from longtrain.plan.step import StepPlan

MEMORY_FEATURES = ("none", "checkpointing", "streambp", "streambp+offload")
AT_LEAST_AS_FAST = {"checkpointing": ("none",), "streambp": ("none",), "streambp+offload": ("none", "streambp")}
"""feature -> the features of the same layout that are at least as fast by construction: no
memory feature runs the step once (checkpointing and StreamBP recompute the forward), StreamBP
without offload runs the same work without the host copies. A row is planned once those are
planned and do not fit (module docstring), except :data:`PLANNED_FIRST`, which is planned first."""
HOLDS_AT_MOST = {"none": ("checkpointing",)}
"""feature -> the features of the same layout whose step holds at most what its own holds at each
point (checkpointing keeps a subset of the activations no memory feature keeps, and runs the same
ops): where one of those does not fit, the feature is not planned (module docstring)."""
PLANNED_FIRST = "checkpointing"
"""The feature each (Ulysses, ring, ZeRO stage) group plans first: the one the others wait on."""
LIBRARY_LOGGERS = ("longtrain", "DeepSpeed")
"""Loggers whose lines below WARNING a plan keeps quiet (they would interleave with its output)."""


@dataclass
class SweepRow:
    """One layout of a sweep and its plan (None when refused: ``error`` says why)."""

    ulysses: int
    ring: int
    dp: int
    zero_stage: int
    memory: str
    plan: Optional[StepPlan] = None
    error: str = ""
    floor_bytes: Optional[int] = None
    """Set on a row left unplanned: the bytes alive when its step would start (its group's first
    plan's :attr:`~longtrain.plan.step.StepPlan.start_bytes`), more than the GPU holds; or, with
    ``exceeds``, the peak of a feature whose step holds no more."""
    faster_fits: str = ""
    """Set on a row left unplanned: the memory feature of the same layout that fits and is at
    least as fast (:data:`AT_LEAST_AS_FAST`)."""
    exceeds: str = ""
    """Set on a row left unplanned: the memory feature of the same layout whose step holds no more
    and does not fit (:data:`HOLDS_AT_MOST`); ``floor_bytes`` is that feature's peak."""
    seconds: Optional[float] = None
    """Wall seconds its plan (or refusal) took in its worker; None when not planned."""

    def fits(self, gpu: Gpu) -> bool:
        return self.plan is not None and gpu.fits(self.plan)

    def as_dict(self, gpu: Gpu) -> dict:
        out = {k: getattr(self, k) for k in ("ulysses", "ring", "dp", "zero_stage", "memory", "error", "floor_bytes",
                                              "faster_fits", "exceeds", "seconds")}
        out["fits"] = self.fits(gpu)
        out["plan"] = None if self.plan is None else dataclasses.asdict(self.plan)
        return out


def layout_config(cfg: Config, ulysses: int, ring: int, zero_stage: int, memory: str) -> Config:
    """``cfg`` with the sweep's keys of one layout set (``parallel.sp``, ``zero.stage``, ``memory``)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel.sp.ulysses, cfg.parallel.sp.ring = ulysses, ring
    cfg.zero.stage = zero_stage
    mc = cfg.memory
    mc.checkpointing = memory == "checkpointing"
    mc.streambp.enabled = memory.startswith("streambp")
    mc.offload_checkpoints = memory == "streambp+offload"
    return cfg


def layouts(world_size: int, zero_stages: Tuple[int, ...]) -> Iterator[Tuple[int, int, int, int, str]]:
    """(ulysses, ring, dp, zero stage, memory feature) of every layout of ``world_size`` ranks."""
    for ulysses in divisors(world_size):
        for ring in divisors(world_size // ulysses):
            dp = world_size // (ulysses * ring)
            for stage in zero_stages:
                for memory in MEMORY_FEATURES:
                    yield ulysses, ring, dp, stage, memory


def sweep(cfg: Config, gpu: Gpu, world_size: int, net: Optional[Interconnect] = None,
          zero_stages: Tuple[int, ...] = (0, 1, 2, 3), progress: Optional[Callable[[str], None]] = None,
          exact: bool = False, jobs: int = 1) -> List[SweepRow]:
    """Plan every layout (:func:`layouts`) in ``jobs`` processes (1: this one) and return the rows
    sorted as the module docstring says; each plan extends a few layers to the model's depth
    (:mod:`longtrain.plan.depth`) unless ``exact``."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    todo = list(layouts(world_size, zero_stages))
    rows = [SweepRow(*layout) for layout in todo]
    groups: Dict[tuple, List[SweepRow]] = {}
    for row in rows:
        groups.setdefault((row.ulysses, row.ring, row.zero_stage), []).append(row)
    done = 0

    def report(row: SweepRow) -> None:
        nonlocal done
        done += 1
        what = (row.error or (f"{row.plan.peak_bytes / 2**30:.2f} GiB, {row.plan.tokens_per_s:,.0f} tokens/s"
                              if row.plan is not None else
                              f"not planned: {row.faster_fits} fits and is at least as fast" if row.faster_fits else
                              f"not planned: more than {row.exceeds}'s {row.floor_bytes / 2**30:.2f} GiB"
                              if row.exceeds else
                              f"not planned: {row.floor_bytes / 2**30:.2f} GiB alive before the step"))
        if row.seconds is not None:
            whole = row.plan is not None and row.plan.depth_probes is None
            what += f" (planned in {row.seconds:.0f} s" + (", every layer" if whole else "") + ")"
        progress(f"[{done}/{len(todo)}] ulysses={row.ulysses} ring={row.ring} dp={row.dp} zero={row.zero_stage} "
                 f"{row.memory}: {what}")

    settled, started = set(), set()

    def leave_out(group: List[SweepRow], start_bytes: int) -> None:
        """Settle ``group``'s rows not started as not fitting: ``start_bytes`` alive before the step."""
        for other in group:
            if id(other) not in settled and id(other) not in started:
                other.floor_bytes = start_bytes
                settled.add(id(other))
                report(other)

    def settle(row: SweepRow, timed) -> List[SweepRow]:
        """Record ``timed`` (a plan or the refusal, and its seconds) on ``row``; the rows of its group to plan now."""
        result, row.seconds = timed
        if isinstance(result, ValueError):
            row.error = str(result).splitlines()[0]
        else:
            row.plan = result
        settled.add(id(row))
        report(row)
        group = groups[(row.ulysses, row.ring, row.zero_stage)]
        first = _first(group)
        if row is first and first.plan is not None and first.plan.start_bytes > gpu.memory_bytes:
            for key, others in groups.items():  # the same bytes in every layout of the stage (docstring)
                if key[2] == row.zero_stage:
                    leave_out(others, first.plan.start_bytes)
            return []
        ready = []
        for other in group:
            if id(other) in settled or id(other) in started:
                continue
            faster = [r for r in group if r.memory in AT_LEAST_AS_FAST.get(other.memory, ())]
            smaller = [r for r in group if r.memory in HOLDS_AT_MOST.get(other.memory, ())]
            if not all(id(r) in settled for r in faster + smaller):
                continue
            over = next((r for r in smaller if r.plan is not None and not r.fits(gpu)), None)
            if over is not None:
                other.exceeds, other.floor_bytes = over.memory, over.plan.peak_bytes
            else:
                other.faster_fits = next((r.memory for r in faster if r.fits(gpu)), "")
            if not other.faster_fits and not other.exceeds:
                ready.append(other)
                continue
            settled.add(id(other))
            report(other)
        return ready

    args = (world_size, gpu, net, exact)
    queue = [_first(group) for group in groups.values()]

    def take() -> Optional[SweepRow]:
        """The next row of the queue still to plan (marked started), None when none is left."""
        while queue:
            row = queue.pop(0)
            if id(row) not in settled and id(row) not in started:
                started.add(id(row))
                return row
        return None

    if jobs <= 1:
        while (row := take()) is not None:
            queue[:0] = settle(row, _plan_row(cfg, _row_layout(row), *args))
        return sorted(rows, key=lambda r: _order(r, gpu))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state of this one's plans
    with futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_quiet_worker,
                                     initargs=(worker_threads(jobs, os.cpu_count() or 1),)) as pool:
        pending: Dict[futures.Future, SweepRow] = {}
        while True:
            while len(pending) < jobs and (row := take()) is not None:  # one plan per worker: a queued
                pending[pool.submit(_plan_row, cfg, _row_layout(row), *args)] = row  # row may yet be left out
            if not pending:
                break
            finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                row = pending.pop(future)
                queue[:0] = settle(row, future.result())
    return sorted(rows, key=lambda r: _order(r, gpu))


def _first(group: List[SweepRow]) -> SweepRow:
    """The row of ``group`` planned first (:data:`PLANNED_FIRST`)."""
    return next(r for r in group if r.memory == PLANNED_FIRST)


def _row_layout(row: SweepRow) -> Tuple[int, int, int, str]:
    """(ulysses, ring, ZeRO stage, memory feature) of ``row``."""
    return row.ulysses, row.ring, row.zero_stage, row.memory


def _plan_row(cfg: Config, layout: Tuple[int, int, int, str], world_size: int, gpu: Gpu,
              net: Optional[Interconnect], exact: bool):
    """The plan of one layout, or the ValueError that refuses it (returned: it crosses processes),
    and the wall seconds it took."""
    start = time.perf_counter()
    try:
        result = plan_step(layout_config(cfg, *layout), gpu, world_size=world_size, net=net, exact=exact)
    except ValueError as refused:
        result = ValueError(str(refused))
    return result, time.perf_counter() - start


def worker_threads(jobs: int, cpus: int) -> int:
    """torch's threads in each of ``jobs`` sweep workers on ``cpus`` CPUs: their share, at least one."""
    return max(1, cpus // jobs)


def _quiet_worker(threads: int) -> None:
    """A sweep worker prints nothing on standard output (the sweep's JSON goes there): what
    libraries print goes to standard error, and their log lines below WARNING nowhere. It runs
    torch's ops on ``threads`` threads: each worker's own share of the CPUs. (With torch's default,
    a thread per CPU in every worker, two workers on two CPUs made every plan about four times
    slower than alone: the ops' threads wait on one another's CPUs. A plan gains nothing from a
    second thread alone either: its ops are small, the time is in Python.)"""
    torch.set_num_threads(threads)
    sys.stdout = sys.stderr
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _order(row: SweepRow, gpu: Gpu) -> tuple:
    if row.faster_fits:
        return (1, 0.0)
    if row.floor_bytes is not None:
        return (2, row.floor_bytes)
    if row.plan is None:
        return (3, 0.0)
    if row.fits(gpu):
        return (0, -row.plan.tokens_per_s)
    return (2, row.plan.peak_bytes)


def format_sweep(rows: List[SweepRow], gpu: Gpu) -> str:
    """The sweep as a table, fastest fitting layout first."""
    head = ("ulysses", "ring", "dp", "zero", "memory", "peak GiB", "fits", "tokens/s", "no overlap", "MFU", "bound by", "comm GB/rank")
    lines = [head]
    for r in rows:
        p = r.plan
        if r.faster_fits:
            lines.append((str(r.ulysses), str(r.ring), str(r.dp), str(r.zero_stage), r.memory, "-", "-",
                          f"not planned: {r.faster_fits} fits and is at least as fast", "", "", "", ""))
            continue
        if r.floor_bytes is not None:
            why = f"not planned: holds more than {r.exceeds}" if r.exceeds else "not planned: the state alone does not fit"
            lines.append((str(r.ulysses), str(r.ring), str(r.dp), str(r.zero_stage), r.memory,
                          f"> {r.floor_bytes / 2**30:.2f}", "no", why, "", "", "", ""))
            continue
        if p is None:
            lines.append((str(r.ulysses), str(r.ring), str(r.dp), str(r.zero_stage), r.memory, "-", "refused",
                          r.error[:60], "", "", "", ""))
            continue
        lines.append((str(r.ulysses), str(r.ring), str(r.dp), str(r.zero_stage), r.memory, f"{p.peak_bytes / 2**30:.2f}",
                      "yes" if r.fits(gpu) else "no", f"{p.tokens_per_s:,.0f}", f"{p.tokens_per_s_serial:,.0f}",
                      f"{p.mfu * 100:.1f}%", p.bound_by, f"{p.comm_bytes / 1e9:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


__all__ = ["AT_LEAST_AS_FAST", "HOLDS_AT_MOST", "LIBRARY_LOGGERS", "MEMORY_FEATURES", "PLANNED_FIRST", "SweepRow",
           "format_sweep", "layout_config", "layouts", "sweep", "worker_threads"]
