"""Planning from a few layers (longtrain/plan/depth.py): the extended plan equals the whole model's
plan to the byte (integers exactly; floating-point sums of op times to 1e-9 relative, their order
differs), for dense and MoE models, every memory mode, and Ulysses, ring, data-parallel and ZeRO
layouts; the layer-kind period; and the fallback when a quantity is not linear."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from longtrain.config import register_configs
from longtrain.models import get_model_args
from longtrain.plan import get_gpu, run_step
from longtrain.plan.depth import Axis, NotPeriodic, extend, layer_period, plan_step, probe_depths
from longtrain.plan.step import StepPlan
from longtrain.precheck import compose_config

DEPTH = 16
BASE = ["data.seq_len=1024", "data.micro_batch_size=1", "data.global_batch_size=2", f"model.num_layers={DEPTH}"]
SBP = ["memory.streambp.enabled=true", "memory.streambp.chunk_size=64"]
MOE = ["model.name=tiny_moe", f"model.num_layers={DEPTH}"]
CASES = {  # name: (overrides, world size, GPU target)
    "dense-plain-h100": ([], 1, "h100"),
    "dense-checkpointing-cpu": (["memory.checkpointing=true"], 1, None),
    "dense-streambp-offload-h100": (SBP + ["memory.offload_checkpoints=true"], 1, "h100"),
    "moe-streambp-h100": (MOE + SBP, 1, "h100"),
    "u2-streambp-h100": (SBP + ["parallel.sp.ulysses=2", "model.num_heads=4", "model.num_kv_heads=2"], 2, "h100"),
    "r2-checkpointing-h100": (["memory.checkpointing=true", "parallel.sp.ring=2"], 2, "h100"),
    "dp2-zero3-streambp-h100": (SBP + ["zero.stage=3"], 2, "h100"),
    "dp2-zero3-h100": (["zero.stage=3"], 2, "h100"),
    "moe-plain-h100": (MOE, 1, "h100"),
    "dp2-zero2-offload-h100": (["memory.checkpointing=true", "zero.stage=2", "zero.offload_optimizer=cpu"], 2, "h100"),
    "moe-dp2-zero1-cpu": (MOE + ["zero.stage=1"], 2, None),
}
DEFAULT = {"dense-plain-h100", "moe-plain-h100", "dp2-zero3-h100"}
"""The default run's cases (about a minute); StreamBP under MoE and ZeRO-3 take about four minutes each: slow."""
EXTENDED = {"dense-plain-h100", "dense-checkpointing-cpu", "moe-streambp-h100", "dp2-zero3-streambp-h100",
            "dp2-zero3-h100", "moe-plain-h100"}
"""Cases whose probes are linear: the plan is extended. In the others a local peak is off the line
between the probes (StreamBP + offload, the ring's and Ulysses' backward) and the whole model is
planned; the result is checked the same way."""


def _cfg(overrides):
    register_configs()
    return compose_config([*BASE, *overrides])


def _assert_equal(got: StepPlan, want: StepPlan) -> None:
    for f in dataclasses.fields(StepPlan):
        if f.name in ("peak_tensors", "depth_probes", "extra", "peak_by_key", "largest_by_key",
                      "kinds_by_key"):  # maxima and the peak's split: below
            continue
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "comm":
            assert len(a) == len(b)
            for ra, rb in zip(sorted(a, key=str), sorted(b, key=str)):
                for k in rb:
                    assert ra[k] == pytest.approx(rb[k], rel=1e-9, abs=0), (k, ra, rb)
        elif isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-9, abs=1e-15), f.name
        elif isinstance(b, dict):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-9) for k in b), f.name
        else:
            assert a == b, (f.name, a, b)
    assert {k: v for k, v in got.extra.items() if k != "planned_layers"} == pytest.approx(want.extra, rel=1e-9)
    top = max(want.peak_by_key, key=want.peak_by_key.get)  # the local peaks: the largest one is the same
    assert got.peak_by_key[top] == want.peak_by_key[top] == want.peak_bytes
    assert got.kinds_by_key[top] == want.kinds_by_key[top] and sum(want.kinds_by_key[top].values()) == want.peak_bytes
    top = max(want.largest_by_key, key=want.largest_by_key.get)  # so is the largest transient's op
    assert got.largest_by_key[top] == want.largest_by_key[top] == want.largest_transient


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in CASES])
def test_extended_plan_equals_the_whole_model(name):
    """The probes are planned and extended (``depth_probes`` says which; :data:`EXTENDED`), and the
    result equals the whole model's plan field by field."""
    overrides, world, gpu_name = CASES[name]
    cfg, gpu = _cfg(overrides), get_gpu(gpu_name) if gpu_name else None
    extended = plan_step(cfg, gpu, world_size=world)
    whole = run_step(cfg, gpu, world_size=world)
    if name in EXTENDED:
        assert extended.depth_probes is not None and extended.depth_probes[-1] < DEPTH
    if "zero2" in name:  # planned whole: the make-up of ZeRO-2's peak changes with the depth
        assert extended.depth_probes is None
    _assert_equal(extended, whole)


def test_layer_period_and_probes():
    dense = get_model_args("llama8b")
    assert layer_period(dense) == (0, 1) and probe_depths(dense) == [2, 3, 4]
    every_other = dataclasses.replace(get_model_args("tiny_moe"), num_layers=11, moe_layer_step=2)
    assert layer_period(every_other) == (0, 2)
    assert probe_depths(every_other) == [5, 7, 9]  # 11 layers end with half a period: so do the probes
    first_dense = dataclasses.replace(get_model_args("tiny_moe"), num_layers=12, dense_layers=(0,))
    assert layer_period(first_dense) == (1, 1) and probe_depths(first_dense) == [3, 4, 5]
    assert probe_depths(dataclasses.replace(dense, num_layers=4)) is None  # too shallow: plan it whole


def test_a_quantity_off_the_line_is_refused_and_the_whole_model_planned(caplog):
    """...except the largest transient, which is only reported: kept at its bound."""
    cfg = _cfg([])
    probes = [run_step(cfg, num_layers=d) for d in (2, 3, 4)]
    probes[1] = dataclasses.replace(probes[1], params_bytes=probes[1].params_bytes + 1)
    with pytest.raises(NotPeriodic, match="params_bytes"):
        extend(probes, Axis((2, 3, 4), DEPTH), 1, None)
    top = max(probes[1].peak_by_key, key=probes[1].peak_by_key.get)
    probes[1].peak_by_key[top] += 1  # a local peak off the line
    with pytest.raises(NotPeriodic, match="peak at"):
        extend(probes, Axis((2, 3, 4), DEPTH), 1, None)
    probes[1].peak_by_key[top] -= 1
    top = max(probes[1].largest_by_key, key=probes[1].largest_by_key.get)
    before = [p.largest_by_key[top] for p in probes]
    probes[1].largest_by_key[top] += 1  # the largest transient off its line: a figure only reported,
    with pytest.raises(NotPeriodic, match="params_bytes"):  # kept at its bound, an upper bound
        extend(probes, Axis((2, 3, 4), DEPTH), 1, None)
    probes[1] = dataclasses.replace(probes[1], params_bytes=probes[1].params_bytes - 1)
    steepest = max(before[1] + 1 - before[0], before[2] - before[1] - 1, 0)
    deep = extend(probes, Axis((2, 3, 4), DEPTH), 1, None)
    assert deep.largest_by_key[top] == before[2] + steepest * (DEPTH - 4) == deep.largest_transient
    probes[1].largest_by_key[top] -= 1
    # a maximum whose key changes deeper (ZeRO-2's float64 copy of its flat gradient partition, which
    # grows with the depth, overtakes the embedding-sized copy): each key on its line, the largest wins
    for d, probe in zip((2, 3, 4), probes):
        probe.largest_by_key = {"forward:embedding": 1000, "optimizer:_to_copy": 100 * d}
    deep = extend(probes, Axis((2, 3, 4), DEPTH), 1, None)
    assert deep.largest_transient == 100 * DEPTH and deep.largest_by_key["forward:embedding"] == 1000
    plan = plan_step(cfg, exact=True)
    assert plan.depth_probes is None and plan.peak_bytes == run_step(cfg).peak_bytes


def test_a_probe_takes_the_whole_models_automatic_streambp_chunk():
    """``chunk_size=auto`` sizes StreamBP's chunk from the memory the model's parameters leave: a
    probe of 2 layers must take the 16-layer model's chunk, not its own (on this GPU: 256 against 512),
    or its per-layer working set, and so the line through the probes, is another model's."""
    args = get_model_args("tiny")
    params = dataclasses.replace(args, num_layers=DEPTH).num_params() * 4
    gpu = dataclasses.replace(get_gpu("h100"), memory_bytes=params + 511 * 8 * 10240)  # 10,240 B/token a chunk
    cfg = _cfg(["memory.streambp.enabled=true", "memory.streambp.chunk_size=auto"])
    whole = run_step(cfg, gpu)
    assert whole.streambp_chunk == 256
    assert run_step(cfg, gpu, num_layers=2).streambp_chunk == whole.streambp_chunk


def test_zero2_is_planned_whole(caplog):
    """DeepSpeed's ZeRO-2 allocates its fp32 gradient partition at the first reduction: a shallow
    probe's peak comes before it, a deep model's after it (longtrain/plan/depth.py), so no probes."""
    with caplog.at_level(logging.WARNING, logger="longtrain.plan.depth"):
        plan = plan_step(_cfg(["zero.stage=2"]), world_size=2)
    assert plan.depth_probes is None and "under ZeRO-2 the make-up of the peak changes" in caplog.text
