"""Planning a deep model from a few of its layers: the step is periodic in its layers.

Every decoder layer of a given kind (dense or mixture-of-experts) adds the same storages, FLOPs,
collectives and op times to the step, wherever it sits; the embedding, the final norm, the LM head
and the loss add the same whatever the depth. So each quantity of a plan is ``a + b x depth``
along the depths that keep the pattern of layer kinds, and three plans of a few layers give the
plan of the whole model:

- the layer kinds repeat with a period ``p`` after a prefix of ``k`` layers (a dense model: ``p = 1,
  k = 0``; Qwen3-MoE's ``decoder_sparse_step`` and ``mlp_only_layers`` give others), and a model of
  ``L`` layers ends with ``r = (L - k) mod p`` layers of a started period; the probes keep that
  ending: first depths ``k + r + p``, ``k + r + 2p``, ``k + r + 3p`` (the cheapest, without ZeRO; with one period
  only the first layer is also the last, and in some layouts a few bytes of the step differ: then
  the check below finds that probe off the line and the next set, ``k + r + 2p`` to ``k + r + 4p``,
  reuses two of the three plans);
- every summed quantity (bytes of each kind, host bytes, FLOPs, op times, each collective's count,
  bytes and time) is checked to be exactly linear over the three probes (integers to the unit,
  floating-point sums to 1e-9 relative) and extended to ``L``;
- the peak is the largest of the step's local peaks (the tracker's bytes alive at each op of each
  phase), each extended on its own: a peak that moves to another place in a deeper model (the
  optimizer step overtaking the backward, a gradient reduction overtaking a layer's backward) is
  found there, and then the split of the peak into kinds, measured where the probes peaked, does not
  apply and deeper probes are planned. (Taking the split the probes measured at the place the peak
  moves to would not be safe: a generic op's local peak can lie on its line over the probes and
  above it in the deeper model, 12% at 16 layers for the backward's ``cat`` under Ulysses and
  StreamBP in ``tests/unit/test_plan_depth.py``, and a moving peak is how such a plan shows.) The
  peak must be on its line; a local peak that is not (a generic op that runs in several places) is
  extended at its steepest step between the probes, and must stay below the peak (the assumption: a
  local peak does not grow faster per layer in a deeper model than between the probes);
- small models are not always on the line yet (DeepSpeed's prefetch covers every layer of a shallow
  model; its flat buffers are padded, which alternates with the depth's parity): when three probes
  are not linear, the next set is deeper, or twice as far apart (:data:`ATTEMPTS`), and the whole
  model is planned when no set below its depth is linear (the log says why);
- the largest single transient tensor, a figure the plan reports and nothing else uses, is extended
  op by op as the local peaks are, but an op off its line is kept at its bound instead of sending
  the plan to deeper probes: the figure is then an upper bound (under ZeRO-2 DeepSpeed's fp32 copies
  of gradient pieces, cut by partition boundaries that move with the depth, are such ops);
- ZeRO-2 is planned whole: DeepSpeed allocates its fp32 gradient partition (a buffer over every
  parameter of the rank's partition, so as deep as the model) at its first gradient reduction and
  frees it after the step. In a shallow model the step's peak comes before that reduction, in a
  deep one after it, at the same op: the peak's make-up changes with the depth, which no line
  through shallow probes can show (Llama-3.1-8B with StreamBP + offload at 128K tokens: probes of
  2-4 layers, every byte count on its line, extend to a peak 3.7 GiB below the whole model's; only
  a time sum and a collective count off their lines refused them). Planned whole, a ZeRO-2 row of
  the 8B sweep at 128K takes 18 s to 3.5 minutes;
- the derived figures (step time with overlap, tokens/s, MFU) are recomputed from the extended
  sums, and the largest tensors at the peak are those of the deepest probe (a per-layer tensor
  is the same at any depth; a flat buffer over every parameter grows with it).

``tests/unit/test_plan_depth.py`` holds extended plans equal to whole-model plans to the byte on
small dense and MoE models, every memory mode, and Ulysses, ring, data-parallel and ZeRO layouts.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from longtrain.config import Config
from longtrain.models import ModelArgs
from longtrain.plan.comm import Interconnect
from longtrain.plan.gpus import Gpu
from longtrain.plan.split import PEAK_TENSORS
from longtrain.plan.step import DERIVED, StepPlan, derive_totals, run_step
from longtrain.trainer.build import build_model_args

log = logging.getLogger(__name__)

PROBES = 3
FIRST_PROBE = 2
"""Periods in the shallowest probe (module docstring)."""
ATTEMPTS = ((1, 1), (2, 1), (4, 1), (4, 2), (8, 2))
"""The probe sets tried in turn: (periods in the shallowest probe, periods between probes). Under
ZeRO the first is skipped: DeepSpeed's buckets and ZeRO-3's prefetch span a layer or two, so over
1-3 layers a largest-of quantity (the largest transient tensor) can stay flat and then grow in a
deeper model; from two periods on the tests find every quantity on its line."""
PROBE_BUDGET = 1.5
"""Probes may add up to this many times the model's layers (a probe costs less per layer than the
whole model: it skips nothing, but the whole model's plan is what the probes are against)."""
FLOAT_RTOL = 1e-9
ZERO_PLANNED_WHOLE = 2
"""The ZeRO stage planned whole, never from probes (module docstring)."""


class NotPeriodic(ValueError):
    """A quantity of the probes' plans is not linear in the depth."""


def layer_period(args: ModelArgs) -> Tuple[int, int]:
    """(prefix ``k``, period ``p``) of the model's layer kinds: after ``k`` layers the kinds repeat
    every ``p``; of the pairs that hold, the one with the shallowest probes (``k + 4p``)."""
    moe = set(args.moe_layers)
    n = args.num_layers
    kinds = [i in moe for i in range(n)]
    holds = [(k, p) for p in range(1, n + 1) for k in range(n)
             if all(kinds[i] == kinds[i + p] for i in range(k, n - p))]
    return min(holds, key=lambda kp: (kp[0] + (FIRST_PROBE + PROBES - 1) * kp[1], kp[1]))


def probe_depths(args: ModelArgs, start: int = FIRST_PROBE, spacing: int = 1) -> Optional[List[int]]:
    """The depths of one probe set (module docstring): ``start`` periods deep, ``spacing`` periods
    apart, ending as the model ends; None when they do not all lie below the model's depth."""
    k, p = layer_period(args)
    step = spacing * p
    r = (args.num_layers - k) % step
    depths = [k + r + (start // spacing) * step + j * step for j in range(PROBES)]
    return depths if depths[-1] < args.num_layers else None


@dataclass(frozen=True)
class Axis:
    """Where probes were planned and where their plan is extended: evenly spaced ``positions``
    (depths, or sequence lengths: :mod:`longtrain.plan.length`) and the ``target``, with every
    quantity a polynomial of ``degree`` in the position (1: a line; ``degree + 2`` probes check it).

    Integers must follow it exactly, floats within ``rtol`` of the largest value (on the
    ``degree``-th differences); names in ``loose`` are integers held to the floats' tolerance and
    rounded (collective counts along the sequence: DeepSpeed's parameter prefetch varies by a few
    gathers)."""

    positions: Tuple[int, ...]
    target: int
    degree: int = 1
    rtol: float = FLOAT_RTOL
    loose: Tuple[str, ...] = ()
    follow_peak: bool = False
    """A peak that moves to another op at the target takes its split into kinds from that op's
    local peak (each kind extended), instead of sending the plan to other probes."""

    @property
    def steps(self) -> int:
        """Probe spacings from the last probe to the target."""
        return (self.target - self.positions[-1]) // (self.positions[1] - self.positions[0])

    def differences(self, values: Sequence) -> List[list]:
        """The first to ``degree``-th differences of ``values``."""
        out, row = [], list(values)
        for _ in range(self.degree):
            row = [b - a for a, b in zip(row, row[1:])]
            out.append(row)
        return out

    def at_target(self, last, slopes: Sequence, top) -> object:
        """The polynomial through the last probe with ``slopes`` (its latest difference of each
        order, the highest ``top``) at the target (Newton's forward differences; integers stay exact)."""
        k = self.steps
        if self.degree == 1:
            return last + top * k
        return last + slopes[0] * k + top * (k * (k + 1) // 2)


def extend_value(values: Sequence, axis: Axis, what: str, loose: bool = False):
    """The polynomial through ``values`` (at ``axis.positions``), checked, at ``axis.target``;
    ``loose``: integers held to the floats' tolerance (:attr:`Axis.loose`)."""
    if isinstance(values[0], bool) or values[0] is None or isinstance(values[0], str):
        if any(v != values[0] for v in values):
            raise NotPeriodic(f"{what}: {list(values)!r}")
        return values[0]
    diffs = axis.differences(values)
    top = diffs[-1]
    if isinstance(values[0], int) and not loose:
        if any(d != top[0] for d in top):
            raise NotPeriodic(f"{what}: {list(values)} at {list(axis.positions)}")
        return axis.at_target(values[-1], [d[-1] for d in diffs[:-1]], top[-1])
    if max(top) - min(top) > axis.rtol * max(max(abs(v) for v in values), 1e-300):
        raise NotPeriodic(f"{what}: {list(values)!r} at {list(axis.positions)}")
    if axis.degree == 1:
        out = axis.at_target(values[-1], [d[-1] for d in diffs[:-1]], top[-1])
    else:  # the least-squares polynomial over every probe: the sums' small wobble is not amplified
        out = float(np.polyval(np.polyfit(np.arange(len(values)), np.asarray(values, dtype=float), axis.degree),
                               len(values) - 1 + axis.steps))
    return round(out) if isinstance(values[0], int) else out


def _extend_rows(rows: Sequence[List[dict]], axis: Axis) -> List[dict]:
    """Collective rows, matched by (axis, kind, link), each number extended."""
    keyed = [{(r["axis"], r["kind"], r["link"]): r for r in plan_rows} for plan_rows in rows]
    if any(k.keys() != keyed[0].keys() for k in keyed):
        raise NotPeriodic("the collectives differ between probes")
    out = []
    for key, row in keyed[-1].items():
        out.append({f: extend_value([k[key][f] for k in keyed], axis, f"comm {key} {f}", "comm" in axis.loose)
                    if isinstance(row[f], (int, float)) and not isinstance(row[f], bool) else row[f] for f in row})
    return out


def _extend_maxima(by_key: Sequence[Dict[str, int]], axis: Axis, what: str,
                   bound: bool = False) -> Tuple[Dict[str, int], str]:
    """A maximum over keys (the local peaks, the largest transient by op) at the target: each key's
    value on its line, and the key of the largest. A key off the line is left out where its value
    extended at its steepest step between the probes stays below the largest (module docstring);
    with ``bound``, it is kept at that value instead, so the maximum is an upper bound (for a figure
    only reported, the largest transient: no reason to plan the whole model for it).

    Raises:
        NotPeriodic: a key off the line could reach the largest (without ``bound``).
    """
    lines, bounds = {}, {}
    for key in by_key[-1]:
        values = [b.get(key, 0) for b in by_key]
        try:
            lines[key] = extend_value(values, axis, f"{what} at {key}")
        except NotPeriodic:  # off the line: extended at its steepest step, an upper bound
            bounds[key] = values[-1] + max(max(axis.differences(values)[0]), 0) * axis.steps
    if bound:
        lines.update(bounds)
        bounds = {}
    if not lines:
        raise NotPeriodic(f"{what}: no key is on its line")
    top = max(lines, key=lines.get)
    for key, bound in bounds.items():
        if bound >= lines[top]:
            raise NotPeriodic(f"{what} at {key}: {[b.get(key, 0) for b in by_key]} at {list(axis.positions)} "
                              f"is off the line and could reach the {what}")
    return lines, top


def _extend_kinds(by_key: Sequence[Dict[str, Dict[str, int]]], axis: Axis) -> Dict[str, Dict[str, int]]:
    """Each local peak's split into kinds at the target (a key missing from a probe, or with a kind
    off its line, is left out: only the peak's own key is needed, and it is checked)."""
    out = {}
    for key, kinds in by_key[-1].items():
        if all(key in b for b in by_key):
            try:
                out[key] = {k: extend_value([b[key][k] for b in by_key], axis, f"{key} {k}") for k in kinds}
            except NotPeriodic:
                continue
    return out


def extend(plans: Sequence[StepPlan], axis: Axis, dp: int, gpu: Optional[Gpu]) -> StepPlan:
    """The plan at ``axis.target`` from the probes' ``plans`` at ``axis.positions`` (module
    docstring); the largest tensors at the peak are the last probe's (the caller may extend them).

    Raises:
        NotPeriodic: a quantity is not on its polynomial over the probes.
    """
    peaks, top = _extend_maxima([p.peak_by_key for p in plans], axis, "peak")
    kinds_by_key = _extend_kinds([p.kinds_by_key for p in plans], axis)
    moved = [(x, here) for x, p in zip(axis.positions, plans)
             if (here := max(p.peak_by_key, key=p.peak_by_key.get)) != top]
    if moved and not (axis.follow_peak and top in kinds_by_key):  # the split was measured elsewhere
        raise NotPeriodic(f"the peak moves from {moved[0][1]} (at {moved[0][0]}) to {top} (at {axis.target})")
    largest, top_transient = _extend_maxima([p.largest_by_key for p in plans], axis, "largest transient",
                                            bound=True)
    out = {"peak_by_key": peaks, "largest_by_key": largest, "largest_transient": largest[top_transient],
           "kinds_by_key": kinds_by_key}
    if moved:  # the figures of the peak: the split at the op it moved to (set below)
        out.update(peak_bytes=peaks[top], peak_phase=top.split(":")[0], peak_tensors=[],
                   activations_at_peak=kinds_by_key[top]["other"], buffers_bytes=kinds_by_key[top]["buffers"])
    for f in dataclasses.fields(StepPlan):
        values = [getattr(p, f.name) for p in plans]
        if f.name in out:
            continue
        if moved and f.name == "extra":
            values = [{k: v for k, v in e.items() if not k.startswith("peak_")} for e in values]
        if f.name in DERIVED or f.name in ("peak_tensors", "depth_probes", "seq_probes"):
            out[f.name] = values[-1]
        elif f.name == "comm":
            out[f.name] = _extend_rows(values, axis)
        elif isinstance(values[0], dict):
            if any(v.keys() != values[0].keys() for v in values):
                raise NotPeriodic(f"{f.name}: keys differ between probes")
            out[f.name] = {k: extend_value([v[k] for v in values], axis, f"{f.name}.{k}", f.name in axis.loose)
                           for k in values[-1]
                           if (f.name, k) != ("time_breakdown", "comm_exposed")}  # derived: recombined below
        else:
            out[f.name] = extend_value(values, axis, f.name, f.name in axis.loose)
    plan = StepPlan(**out)
    if moved:  # the tensors the probes listed were alive elsewhere: none listed
        plan.extra = {**plan.extra, **{f"peak_{kind}": n for kind, n in kinds_by_key[top].items()}}
    if plan.peak_bytes != peaks[top] or sum(kinds_by_key.get(top, {}).values()) not in (0, plan.peak_bytes):
        raise NotPeriodic(f"peak_bytes {plan.peak_bytes} is not the largest local peak {peaks[top]} ({top})")
    if gpu is not None:
        derive_totals(plan, dp, gpu)
    return plan


def _extend_depth(plans: Sequence[StepPlan], depths: Sequence[int], depth: int, dp: int,
                  gpu: Optional[Gpu]) -> StepPlan:
    plan = extend(plans, Axis(tuple(depths), depth), dp, gpu)
    plan.extra = {**plan.extra, "planned_layers": float(depth)}
    plan.depth_probes = list(depths)
    return plan


def plan_step(cfg: Config, gpu: Optional[Gpu] = None, world_size: int = 1, net: Optional[Interconnect] = None,
              exact: bool = False, listed: int = PEAK_TENSORS) -> StepPlan:
    """The plan of ``cfg``'s step: from shallow probes (module docstring), or of the whole model when
    ``exact``, when the model is too shallow to probe, or when no probe set below its depth is linear.

    Args: as :func:`~longtrain.plan.step.run_step`; ``exact`` plans every layer and every
    micro-batch (:mod:`longtrain.plan.micro`); ``listed``: how many of the largest tensors at the
    peak the plan lists.
    """
    args = build_model_args(cfg.model)
    dp = world_size // (cfg.parallel.sp.ulysses * cfg.parallel.sp.ring)
    planned: Dict[int, StepPlan] = {}
    why = "asked for every layer" if exact else "too shallow to probe"
    if cfg.zero.stage == ZERO_PLANNED_WHOLE and not exact:
        why = ("under ZeRO-2 the make-up of the peak changes with the depth: DeepSpeed allocates the fp32 "
               "gradient partition at its first reduction, after a shallow model's peak, before a deep one's")
    attempts = () if exact or cfg.zero.stage == ZERO_PLANNED_WHOLE else ATTEMPTS[1:] if cfg.zero.stage else ATTEMPTS
    for start, spacing in attempts:
        depths = probe_depths(args, start, spacing)
        if depths is None or sum(set(depths) | set(planned)) > PROBE_BUDGET * args.num_layers:
            continue  # the probes would cost more than the whole model
        for d in depths:
            if d not in planned:
                planned[d] = run_step(cfg, gpu, world_size=world_size, net=net, num_layers=d, listed=listed)
        try:
            return _extend_depth([planned[d] for d in depths], depths, args.num_layers, dp, gpu)
        except NotPeriodic as err:
            why = f"the probes at depths {depths} are not linear ({err})"
    if not exact:
        log.warning("planning all %d layers: %s", args.num_layers, why)
    return run_step(cfg, gpu, world_size=world_size, net=net, every_micro_batch=exact, listed=listed)


__all__ = ["Axis", "NotPeriodic", "ZERO_PLANNED_WHOLE", "extend", "extend_value", "layer_period", "plan_step", "probe_depths"]
