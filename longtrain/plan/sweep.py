"""``longtrain-plan --sweep``: plan every layout of a world size and rank those that fit by speed.

A layout is a choice of Ulysses and ring degrees (data parallelism takes the rest of the world),
a ZeRO stage, and a memory feature (none, activation checkpointing, StreamBP, StreamBP with the
layer inputs offloaded). Every layout the model and the sequence admit is planned with
:func:`~longtrain.plan.depth.plan_step`; one the code refuses (a head count Ulysses cannot split, a
sequence length the ring cannot cut) is listed with the
reason (ZeRO stages run DeepSpeed's own step in the fake world, two steps each: see
:mod:`longtrain.plan.step`). Rows that fit the GPU come first, fastest first (estimated tokens/s with communication
overlapped), then the rest by peak memory.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

from longtrain.config import Config
from longtrain.models.args import divisors
from longtrain.plan.comm import Interconnect
from longtrain.plan.gpus import Gpu
from longtrain.plan.depth import plan_step
from longtrain.plan.step import StepPlan

MEMORY_FEATURES = ("none", "checkpointing", "streambp", "streambp+offload")


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

    def fits(self, gpu: Gpu) -> bool:
        return self.plan is not None and gpu.fits(self.plan)

    def as_dict(self, gpu: Gpu) -> dict:
        out = {k: getattr(self, k) for k in ("ulysses", "ring", "dp", "zero_stage", "memory", "error")}
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
          exact: bool = False) -> List[SweepRow]:
    """Plan every layout (:func:`layouts`) and return the rows sorted as the module docstring says;
    each plan extends a few layers to the model's depth (:mod:`longtrain.plan.depth`) unless ``exact``."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = []
    todo = list(layouts(world_size, zero_stages))
    for i, (ulysses, ring, dp, stage, memory) in enumerate(todo, 1):
        row = SweepRow(ulysses, ring, dp, stage, memory)
        try:
            row.plan = plan_step(layout_config(cfg, ulysses, ring, stage, memory), gpu, world_size=world_size, net=net,
                                 exact=exact)
        except ValueError as refused:
            row.error = str(refused).splitlines()[0]
        progress(f"[{i}/{len(todo)}] ulysses={ulysses} ring={ring} dp={dp} zero={stage} {memory}: "
                 + (row.error or f"{row.plan.peak_bytes / 2**30:.2f} GiB, {row.plan.tokens_per_s:,.0f} tokens/s"))
        rows.append(row)
    return sorted(rows, key=lambda r: _order(r, gpu))


def _order(row: SweepRow, gpu: Gpu) -> tuple:
    if row.plan is None:
        return (2, 0.0)
    if row.fits(gpu):
        return (0, -row.plan.tokens_per_s)
    return (1, row.plan.peak_bytes)


def format_sweep(rows: List[SweepRow], gpu: Gpu) -> str:
    """The sweep as a table, fastest fitting layout first."""
    head = ("ulysses", "ring", "dp", "zero", "memory", "peak GiB", "fits", "tokens/s", "no overlap", "MFU", "bound by", "comm GB/rank")
    lines = [head]
    for r in rows:
        p = r.plan
        if p is None:
            lines.append((str(r.ulysses), str(r.ring), str(r.dp), str(r.zero_stage), r.memory, "-", "refused",
                          r.error[:60], "", "", "", ""))
            continue
        lines.append((str(r.ulysses), str(r.ring), str(r.dp), str(r.zero_stage), r.memory, f"{p.peak_bytes / 2**30:.2f}",
                      "yes" if r.fits(gpu) else "no", f"{p.tokens_per_s:,.0f}", f"{p.tokens_per_s_serial:,.0f}",
                      f"{p.mfu * 100:.1f}%", p.bound_by, f"{p.comm_bytes / 1e9:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


__all__ = ["MEMORY_FEATURES", "SweepRow", "format_sweep", "layout_config", "layouts", "sweep"]
