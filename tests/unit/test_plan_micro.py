"""Planning a step of many micro-batches from three (longtrain/plan/micro.py): the plan equals the
plan of every micro-batch (integers exactly; floating-point sums to 1e-9 relative, their order
differs) for the plain engine and ZeRO 1-3, every memory mode, Ulysses and ring."""
from __future__ import annotations

import pytest

from longtrain.config import register_configs
from longtrain.plan import get_gpu, run_step
from longtrain.plan.micro import PLANNED, planned_micro_batches
from longtrain.precheck import compose_config
from tests.unit.test_plan_depth import _assert_equal

MICRO = 5
BASE = ["data.seq_len=512", "data.micro_batch_size=1", "model.num_layers=2"]
SBP = ["memory.streambp.enabled=true", "memory.streambp.chunk_size=64"]
CASES = {  # name: (overrides, world size, GPU target); the global batch makes MICRO micro-batches per rank
    "plain-h100": ([], 1, "h100"),
    "checkpointing-cpu": (["memory.checkpointing=true"], 1, None),
    "streambp-offload-h100": (SBP + ["memory.offload_checkpoints=true"], 1, "h100"),
    "u2-streambp-h100": (SBP + ["parallel.sp.ulysses=2", "model.num_heads=4", "model.num_kv_heads=2"], 2, "h100"),
    "r2-zero1-h100": (["parallel.sp.ring=2", "zero.stage=1"], 2, "h100"),
    "dp2-zero2-offload-h100": (["memory.checkpointing=true", "zero.stage=2", "zero.offload_optimizer=cpu"], 2, "h100"),
    "dp2-zero3-streambp-h100": (SBP + ["zero.stage=3"], 2, "h100"),
}
DEFAULT = {"plain-h100", "u2-streambp-h100", "dp2-zero3-streambp-h100"}


def _cfg(overrides, world):
    register_configs()
    cfg = compose_config([*BASE, *overrides])
    dp = world // (cfg.parallel.sp.ulysses * cfg.parallel.sp.ring)
    cfg.data.global_batch_size = MICRO * dp
    return cfg


def test_planned_micro_batches():
    batches = [{"i": i} for i in range(MICRO)]
    assert planned_micro_batches(batches, every=False) == [batches[0], batches[1], batches[-1]]
    assert planned_micro_batches(batches, every=True) == batches
    assert planned_micro_batches(batches[:PLANNED], every=False) == batches[:PLANNED]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in CASES])
def test_three_micro_batches_plan_the_step(name):
    overrides, world, gpu_name = CASES[name]
    cfg, gpu = _cfg(overrides, world), get_gpu(gpu_name) if gpu_name else None
    short = run_step(cfg, gpu, world_size=world)
    every = run_step(cfg, gpu, world_size=world, every_micro_batch=True)
    assert short.extra.pop("planned_micro_batches") == PLANNED
    assert "planned_micro_batches" not in every.extra
    assert short.tokens == every.tokens == MICRO * 512
    assert sum(r["count"] for r in every.comm) == sum(r["count"] for r in short.comm)
    _assert_equal(short, every)
    assert short.peak_by_key == every.peak_by_key
