"""Planning a long step from four shorter ones (longtrain/plan/length.py): under StreamBP the
extended plan equals the plan at the length itself, byte counts and FLOPs exactly, times and
collectives within 2e-2 relative (on these tiny models a few ops' roofline changes side as their key
prefix grows, so the clock's sums are polynomial only to about 1%; Llama-3.1-8B's are within 1e-3:
docs/PLANNING.md); the fallbacks."""
from __future__ import annotations

import dataclasses

import pytest

from longtrain.config import register_configs
from longtrain.plan import get_gpu
from longtrain.plan.depth import NotPeriodic, plan_step as plan_at_length
from longtrain.plan.length import extend_seq, plan_step, probe_lengths, seq_unit, with_chunk, with_seq
from longtrain.plan.step import StepPlan
from longtrain.precheck import compose_config

CHUNK = 64
BASE = ["data.micro_batch_size=1", "data.global_batch_size=1", "model.num_layers=2", "memory.streambp.enabled=true",
        f"memory.streambp.chunk_size={CHUNK}", "trainer.loss_chunk_size=128"]
TIME_RTOL = 2e-2
CASES = {  # name: (overrides, world size, sequence-parallel ranks, chunks per rank, remainder in tokens)
    "dense-offload": (["memory.offload_checkpoints=true"], 1, 1, 40, 0),
    "u2-zero3-remainder": (["parallel.sp.ulysses=2", "model.num_heads=4", "model.num_kv_heads=2", "zero.stage=3"],
                           2, 2, 40, 64),
    "r2": (["parallel.sp.ring=2"], 2, 2, 40, 0),
    "moe-accumulation-2": (["model.name=tiny_moe", "model.num_layers=2", "data.global_batch_size=2"], 1, 1, 40, 0),
}
DEFAULT = {"dense-offload", "u2-zero3-remainder"}
AT_ITS_LENGTH = {"r2"}
"""Cases planned at their length: the ring's attention time on this tiny model is off its polynomial
(its small blocks change between memory- and compute-bound from probe to probe)."""


def _cfg(overrides, seq):
    register_configs()
    return compose_config([*BASE, *overrides, f"data.seq_len={seq}"])


def _assert_close(got: StepPlan, want: StepPlan) -> None:
    for f in dataclasses.fields(StepPlan):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name in ("seq_probes", "kinds_by_key", "peak_by_key", "largest_by_key", "depth_probes"):
            continue
        if f.name == "comm":
            assert sorted((r["axis"], r["kind"]) for r in a) == sorted((r["axis"], r["kind"]) for r in b)
            for ra, rb in zip(sorted(a, key=lambda r: (r["axis"], r["kind"])), sorted(b, key=lambda r: (r["axis"], r["kind"]))):
                for k in ("count", "bytes_sent", "time_s"):
                    assert ra[k] == pytest.approx(rb[k], rel=TIME_RTOL), (k, ra, rb)
        elif f.name in ("comm_bytes", "comm_by_phase"):
            assert a == pytest.approx(b, rel=TIME_RTOL), f.name
        elif isinstance(b, float) or (isinstance(b, dict) and b and isinstance(next(iter(b.values())), float)):
            assert a == pytest.approx(b, rel=TIME_RTOL, abs=1e-12), f.name
        elif f.name == "peak_tensors":  # none listed when the peak moved to another op beyond the probes
            assert a in ([], b), (a, b)
        else:  # bytes, FLOPs, the peak's phase and split: exact
            assert a == b, (f.name, a, b)
    top = max(want.peak_by_key, key=want.peak_by_key.get)
    assert got.peak_by_key[top] == want.peak_bytes and got.kinds_by_key[top] == want.kinds_by_key[top]
    # the tracker's split at every local peak adds up to that peak (the split a moved peak takes)
    assert all(sum(kinds.values()) == want.peak_by_key[key] for key, kinds in want.kinds_by_key.items())


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in CASES])
def test_extended_plan_equals_the_plan_at_the_length(name):
    overrides, world, sp, chunks, rest = CASES[name]
    seq = chunks * CHUNK * sp + rest
    cfg, gpu = _cfg(overrides, seq), get_gpu("h100")
    extended = plan_step(cfg, gpu, world_size=world)
    probes = [(3 + j) * CHUNK * sp + rest for j in range(4)]
    assert extended.seq_probes == (None if name in AT_ITS_LENGTH else probes)
    _assert_close(extended, plan_at_length(cfg, gpu, world_size=world))


def test_probe_lengths_and_when_the_step_is_planned_at_its_length():
    assert probe_lengths(40 * 128 + 64, 128, 3, 1) == [3 * 128 + 64, 4 * 128 + 64, 5 * 128 + 64, 6 * 128 + 64]
    assert probe_lengths(30 * 128, 128, 3, 1) is None  # the probes would cost more than half the step
    cfg = _cfg([], 20 * CHUNK)
    assert seq_unit(with_chunk(cfg, None)) == CHUNK
    assert plan_step(cfg, get_gpu("h100")).seq_probes is None  # too short to extend
    assert seq_unit(with_chunk(_cfg(["memory.streambp.enabled=false"], 4096), None)) is None
    odd = _cfg(["parallel.sp.ring=2", "memory.streambp.chunk_size=63"], 4096)
    assert seq_unit(with_chunk(odd, None)) is None  # 126 tokens: not a length the zigzag ring can cut
    assert plan_step(_cfg([], 40 * CHUNK), get_gpu("h100"), exact=True).seq_probes is None


def test_a_byte_count_off_its_polynomial_is_refused():
    gpu = get_gpu("h100")
    cfg = with_chunk(_cfg([], 40 * CHUNK), gpu)
    lengths = probe_lengths(40 * CHUNK, CHUNK, 3, 1)
    probes = [plan_at_length(with_seq(cfg, n), gpu) for n in lengths]
    extend_seq(probes, lengths, 40 * CHUNK, 1, gpu)
    probes[2] = dataclasses.replace(probes[2], host_bytes=probes[2].host_bytes + 512)
    with pytest.raises(NotPeriodic, match="host_bytes"):
        extend_seq(probes, lengths, 40 * CHUNK, 1, gpu)
