"""Planning a long sequence from a few shorter ones: StreamBP's chunks repeat along the sequence.

Under StreamBP every decoder layer's backward walks this rank's slice of the sequence in chunks of
``c`` tokens, so a step of ``S = n x u + r`` tokens (``u = c x ulysses x ring``: one chunk on every
rank) runs ``n`` full chunks per layer and one of the remainder. Each chunk allocates the same
working set and adds the same matmul work; what grows with ``n`` is the whole-sequence tensors (the
layer inputs, their host copies, K/V, the dK/dV accumulators, the input gradient: linear in ``n``)
and the attention each chunk computes over its key prefix (quadratic). So at one chunk and one
remainder every quantity of a plan is a polynomial of degree at most 2 in ``n``, and four plans at
``n0 .. n0 + 3`` chunks per rank (the same remainder) give the plan at ``n``
(:class:`~longtrain.plan.depth.Axis` of degree 2, the depth's machinery):

- every byte count (the peak, its split into kinds, each local peak by op, host and pinned bytes,
  the activations kept) and the FLOPs must follow it exactly: integers, second differences equal
  over the four probes;
- the clock's times, and the collectives' counts and bytes, within :data:`SEQ_RTOL` of their largest
  value: the clock takes the larger of an op's compute and memory terms and a few ops change side as
  their key prefix grows, and ZeRO-3's parameter prefetch gathers a few times more or fewer from one
  length to the next (Llama-3.1-8B on 8 ranks: 660, 666, 670 gathers at 4, 5, 6 chunks per rank);
- the peak must be at the same op in all four (a short step peaks in its forward, a long one in the
  backward: such probes are off the polynomial and the next set, further out, is tried);
- the largest tensors at the peak: the probes list :data:`LISTED` of them, matched by (phase, op,
  kind, dtype, rank), and those on their line are extended and the largest :data:`PEAK_TENSORS` kept
  (none when the peak moved: the probes' were alive at another op);
- the largest single transient tensor, a figure only reported, is extended by the op that made it
  and is a lower bound where an op's output that grows with the length stays below another output
  of the same op at every probe (Llama-3.1-8B at 8M tokens on 8 ranks: the forward's whole-sequence
  output projection, 8 GiB, below a chunk's 1 GiB MLP product at the probes: 2 GiB reported).

The chunk is the target's (``chunk_size=auto`` resolved at the target length, not at a probe's),
and the shortest probe holds at least ``trainer.loss_chunk_size`` tokens per rank (below that the
chunked loss's logits grow with the length).
The probes must cost less than the target (their lengths add up to at most half of it,
:data:`COST_RATIO`); otherwise, under
``--exact``, without StreamBP, or when no probe set is on its polynomial, the step is planned at its
length (each plan still extended from a few layers, :mod:`longtrain.plan.depth`). A shared
``probes`` dict lets a ``--max-seq`` search reuse the probes of one remainder for every length.

``tests/unit/test_plan_length.py`` holds extended plans equal to plans at the length itself, to the
byte, on small models under Ulysses, ring and ZeRO layouts.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from longtrain.config import Config
from longtrain.plan.comm import Interconnect
from longtrain.plan.depth import Axis, NotPeriodic, extend, extend_value
from longtrain.plan.depth import plan_step as plan_depth
from longtrain.plan.gpus import Gpu
from longtrain.plan.split import PEAK_TENSORS
from longtrain.plan.step import StepPlan, long_chunk
from longtrain.trainer.build import resolve_precision

log = logging.getLogger(__name__)

PROBES = 4
ATTEMPTS = ((3, 1), (6, 2))
"""The probe sets tried in turn: (chunks per rank of the shortest probe, chunks between probes)."""
COST_RATIO = 2
"""A probe set is planned when its lengths add up to at most this fraction of the target's: a plan
also costs a fixed time whatever its length (building the engine, the depth probes), about that of
ten chunks per rank of Llama-3.1-8B on 8 ranks (a plan at 3 chunks per rank took 17 s, at 20, 55 s)."""
SEQ_RTOL = 5e-2
"""How far (relative to the largest value) the second differences of a time, or of a collective's
count or bytes, may differ over the probes (module docstring)."""
LOOSE = ("comm", "comm_bytes", "comm_by_phase")
"""The integer quantities held to :data:`SEQ_RTOL` instead of exactness."""
LISTED = 4 * PEAK_TENSORS
"""How many of the largest tensors at the peak each probe lists (a tensor that grows with the length
can be outside a short probe's first :data:`PEAK_TENSORS` and inside the long step's)."""

Probes = Dict[Tuple[int, int], StepPlan]
"""Probe plans by (sequence length, StreamBP chunk): a cache a caller may share between plans."""


def with_seq(cfg: Config, seq_len: int) -> Config:
    """``cfg`` with ``data.seq_len=seq_len``."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))


def with_chunk(cfg: Config, gpu: Optional[Gpu]) -> Config:
    """``cfg`` with StreamBP's ``chunk_size=auto`` resolved at ``data.seq_len`` for ``gpu``."""
    sc = cfg.memory.streambp
    if not sc.enabled or sc.chunk_size != "auto":
        return cfg
    bf16 = resolve_precision(cfg.trainer.precision, torch.device("cuda" if gpu else "cpu")) == "bf16"
    chunk = long_chunk(cfg, gpu, bf16, cfg.data.seq_len)
    return dataclasses.replace(cfg, memory=dataclasses.replace(
        cfg.memory, streambp=dataclasses.replace(sc, chunk_size=chunk)))


def seq_unit(cfg: Config) -> Optional[int]:
    """Tokens of one StreamBP chunk on every rank of the sequence-parallel group (the period along
    the sequence), for ``cfg`` with its chunk resolved (:func:`with_chunk`); None without StreamBP
    or when the layout cannot cut a length of whole units (an odd chunk over a zigzag ring)."""
    sc, sp = cfg.memory.streambp, cfg.parallel.sp
    if not sc.enabled or not isinstance(sc.chunk_size, int):
        return None
    unit = sc.chunk_size * sp.ulysses * sp.ring
    cut = sp.ulysses * (2 * sp.ring if sp.ring > 1 else 1)  # the lengths the layout can cut
    return unit if unit % cut == 0 else None


def probe_lengths(seq_len: int, unit: int, first: int, spacing: int) -> Optional[List[int]]:
    """The lengths of one probe set: ``first``, ``first + spacing``, ... chunks per rank with
    ``seq_len``'s remainder; None when they add up to more than ``1 / COST_RATIO`` of ``seq_len``."""
    rest = seq_len % unit
    lengths = [(first + j * spacing) * unit + rest for j in range(PROBES)]
    return lengths if sum(lengths) * COST_RATIO <= seq_len else None


def _extend_tensors(lists: Sequence[List[dict]], axis: Axis) -> List[dict]:
    """The largest tensors at the peak at the target: each probe's entries matched by (phase, op,
    kind, dtype, rank, order among those), their bytes and shape extended; an entry missing from a
    probe or off its line is left out."""
    def keyed(tensors: List[dict]) -> Dict[tuple, dict]:
        seen: collections.Counter = collections.Counter()
        out = {}
        for t in tensors:
            sig = (t["made_in"], t["op"], t["kind"], t["dtype"], len(t["shape"]))
            out[(*sig, seen[sig])] = t
            seen[sig] += 1
        return out

    maps = [keyed(tensors) for tensors in lists]
    out = []
    for key, t in maps[-1].items():
        if not all(key in m for m in maps):
            continue
        try:
            nbytes = extend_value([m[key]["bytes"] for m in maps], axis, "tensor bytes")
            shape = [extend_value([m[key]["shape"][i] for m in maps], axis, "tensor shape")
                     for i in range(len(t["shape"]))]
        except NotPeriodic:
            continue
        out.append({**t, "bytes": nbytes, "shape": shape})
    return sorted(out, key=lambda t: -t["bytes"])[:PEAK_TENSORS]


def extend_seq(plans: Sequence[StepPlan], lengths: Sequence[int], seq_len: int, dp: int,
               gpu: Optional[Gpu]) -> StepPlan:
    """The plan at ``seq_len`` from the probes' ``plans`` at ``lengths`` (module docstring).

    Raises:
        NotPeriodic: a quantity is not on its polynomial over the probes.
    """
    axis = Axis(tuple(lengths), seq_len, degree=2, rtol=SEQ_RTOL, loose=LOOSE, follow_peak=True)
    plan = extend(plans, axis, dp, gpu)
    if plan.peak_tensors:  # (none when the peak moved to another op: the probes' were alive elsewhere)
        plan.peak_tensors = _extend_tensors([p.peak_tensors for p in plans], axis)
    plan.seq_probes = list(lengths)
    return plan


def plan_step(cfg: Config, gpu: Optional[Gpu] = None, world_size: int = 1, net: Optional[Interconnect] = None,
              exact: bool = False, probes: Optional[Probes] = None) -> StepPlan:
    """The plan of ``cfg``'s step: under StreamBP from four shorter steps (module docstring), else, or
    when ``exact``, or when no probe set is on its polynomial, at its own length
    (:func:`longtrain.plan.depth.plan_step`, whose arguments these are); ``probes``: a cache of
    probe plans to share between calls with the same ``cfg`` but ``data.seq_len``."""
    if exact:
        return plan_depth(cfg, gpu, world_size, net, exact=True)
    cfg = with_chunk(cfg, gpu)
    unit = seq_unit(cfg)
    if unit is None:
        return plan_depth(cfg, gpu, world_size, net)
    seq, chunk = cfg.data.seq_len, cfg.memory.streambp.chunk_size
    dp = world_size // (cfg.parallel.sp.ulysses * cfg.parallel.sp.ring)
    planned = {} if probes is None else probes
    # the shortest probe is past the loss's chunk too (below it the logits chunk grows with the length)
    past_loss = -(-cfg.trainer.loss_chunk_size // (chunk * cfg.data.micro_batch_size))
    for first, spacing in ATTEMPTS:
        lengths = probe_lengths(seq, unit, max(first, past_loss), spacing)
        if lengths is None:
            continue
        for length in lengths:
            if (length, chunk) not in planned:
                planned[(length, chunk)] = plan_depth(with_seq(cfg, length), gpu, world_size, net, listed=LISTED)
        try:
            return extend_seq([planned[(length, chunk)] for length in lengths], lengths, seq, dp, gpu)
        except NotPeriodic as err:
            log.info("the probes at %s tokens are not on their polynomial (%s)", lengths, err)
    return plan_depth(cfg, gpu, world_size, net)


__all__ = ["ATTEMPTS", "LISTED", "Probes", "SEQ_RTOL", "extend_seq", "plan_step", "probe_lengths", "seq_unit",
           "with_chunk", "with_seq"]
