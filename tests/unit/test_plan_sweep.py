"""``longtrain-plan --sweep`` (longtrain/plan/sweep.py): every layout of a world size, the fitting
ones fastest first; a row whose layout fits with a feature at least as fast is left out, and so is
one whose layout does not fit with a feature that holds no more; a ZeRO stage whose state alone
exceeds the GPU is not planned further; plans in worker processes give the same rows as one process."""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import sys

import pytest

import longtrain.plan.cli as plan_cli
from longtrain.config import register_configs
from longtrain.plan import get_gpu, run_step
from longtrain.plan.depth import plan_step
from longtrain.plan.sweep import (AT_LEAST_AS_FAST, HOLDS_AT_MOST, MEMORY_FEATURES, PLANNED_FIRST, format_sweep,
                                  layout_config, sweep, worker_threads)
from longtrain.precheck import compose_config

SMALL = ["data.seq_len=256", "data.micro_batch_size=1", "data.global_batch_size=2"]


def _cfg(overrides=()):
    register_configs()
    return compose_config([*SMALL, *overrides])


def _key(ulysses, ring, stage, memory, plan):
    return ulysses, ring, stage, memory, None if plan is None else (plan["peak_bytes"], plan["flops"], plan["time_s"])


def test_sweep_ranks_fitting_layouts_by_speed_the_same_in_worker_processes(capfd, monkeypatch):
    gpu = get_gpu("h100")
    rows = sweep(_cfg(), gpu, 2, zero_stages=(0,), progress=lambda msg: None)
    assert len(rows) == 3 * 4  # (u, r) in (1,1) (1,2) (2,1), four memory features
    speeds = [r.plan.tokens_per_s for r in rows if r.fits(gpu)]
    # checkpointing (planned first) and no memory feature fit; StreamBP with and without offload wait
    assert speeds == sorted(speeds, reverse=True) and len(speeds) == 6
    assert sorted(r.memory for r in rows[:6]) == ["checkpointing"] * 3 + ["none"] * 3
    assert [r.faster_fits for r in rows[6:]] == ["none"] * 6 and not any(r.plan for r in rows[6:])
    assert {(r.ulysses, r.ring, r.dp) for r in rows} == {(1, 1, 2), (1, 2, 1), (2, 1, 1)}
    # the table's one-screen summary: the count, then the fastest row's plan as a single plan shows it
    head, verdict, *_ = plan_cli.sweep_summary(_cfg(), gpu, rows, 5.0).splitlines()
    assert head == "6 of 12 layouts fit h100 (6 planned, 6 left out or refused; swept in 5 s), the fastest:"
    assert verdict.startswith(f"FITS: {_cfg().model.name}, seq_len 256") and rows[0].memory in {"none", "checkpointing"}
    assert f"{rows[0].plan.tokens_per_s:,.0f} tokens/s" in plan_cli.sweep_summary(_cfg(), gpu, rows, 5.0)
    # The command line's sweep, without the ZeRO stages here (the slow test below plans them all), in
    # two worker processes: the same rows in the same order, and nothing but the JSON on standard
    # output (capfd sees what the workers write to the file descriptor too).
    monkeypatch.setattr(plan_cli, "sweep", functools.partial(sweep, zero_stages=(0,)))
    assert plan_cli.main([*SMALL, "--sweep", "--world-size", "2", "--json", "--jobs", "2"]) == 0
    doc = json.loads(capfd.readouterr().out)
    assert doc["world_size"] == 2 and doc["rows"][0]["fits"] and doc["rows"][0]["plan"]["tokens_per_s"] > 0
    want = [_key(r.ulysses, r.ring, r.zero_stage, r.memory, r.plan and dataclasses.asdict(r.plan)) for r in rows]
    assert [_key(r["ulysses"], r["ring"], r["zero_stage"], r["memory"], r["plan"]) for r in doc["rows"]] == want


def test_a_zero_stage_whose_state_alone_exceeds_the_gpu_is_not_planned_further():
    cfg = _cfg()
    start = plan_step(layout_config(cfg, 1, 2, 0, PLANNED_FIRST), world_size=2).start_bytes
    small = dataclasses.replace(get_gpu("h100"), name="small", memory_bytes=start - 1)
    said = []
    rows = sweep(cfg, small, 2, zero_stages=(0,), progress=said.append)
    planned = [r for r in rows if r.plan is not None]
    assert [(r.ulysses, r.ring, r.memory) for r in planned] == [(1, 1, PLANNED_FIRST)]
    floors = [r for r in rows if r.floor_bytes is not None]
    assert len(floors) == 11 and len(said) == 12 and not any(r.fits(small) for r in rows)
    assert {r.floor_bytes for r in floors} == {start}
    assert "not planned: the state alone does not fit" in format_sweep(rows, small)
    head, verdict, *_ = plan_cli.sweep_summary(cfg, small, rows, 1.0).splitlines()
    assert head.startswith("0 of 12 layouts fit small (1 planned, 11 left out") and "the smallest peak" in head
    assert verdict.startswith("DOES NOT FIT (device memory)")
    # what the prune rests on: every layout of the stage and every memory feature start the step
    # with the same bytes (and so none fits)
    for ulysses, ring, memory in [(1, 1, PLANNED_FIRST), (2, 1, PLANNED_FIRST),
                                  *((1, 2, m) for m in set(MEMORY_FEATURES) - {PLANNED_FIRST})]:
        plan = plan_step(layout_config(cfg, ulysses, ring, 0, memory), small, world_size=2)
        assert plan.start_bytes == start and not small.fits(plan), (ulysses, ring, memory)


def test_a_row_is_left_out_only_where_a_faster_feature_fits_or_one_holding_less_does_not():
    """Two GPUs sized from this layout's plans (each left-out row also planned here, to check the
    rules): one that StreamBP and checkpointing fit and no memory feature does not, where StreamBP
    + offload is left out (StreamBP fits and is at least as fast); one a byte short of
    checkpointing's peak, where no memory feature is left out (it holds more than checkpointing)."""
    cfg = _cfg()
    plans = {memory: plan_step(layout_config(cfg, 2, 1, 0, memory), world_size=2, gpu=get_gpu("h100"))
             for memory in MEMORY_FEATURES}
    for memory, faster in AT_LEAST_AS_FAST.items():
        for other in faster:
            assert plans[memory].tokens_per_s <= plans[other].tokens_per_s, (memory, other)
    for memory, smaller in HOLDS_AT_MOST.items():
        for other in smaller:
            assert plans[memory].peak_bytes >= plans[other].peak_bytes, (memory, other)
    both = max(plans["checkpointing"].peak_bytes, plans["streambp"].peak_bytes)
    assert plans["none"].peak_bytes > both
    tables = []
    for name, size in (("streambp-sized", both), ("short", plans["checkpointing"].peak_bytes - 1)):
        gpu = dataclasses.replace(get_gpu("h100"), name=name, memory_bytes=size)
        said = []
        rows = sweep(cfg, gpu, 2, zero_stages=(0,), progress=said.append)
        mine = {r.memory: r for r in rows if (r.ulysses, r.ring) == (2, 1)}
        assert len(said) == 12
        tables.append(format_sweep(rows, gpu))
        if name == "streambp-sized":
            assert mine["streambp"].fits(gpu) and mine["checkpointing"].fits(gpu) and not mine["none"].fits(gpu)
            assert mine["none"].plan is not None and not mine["none"].exceeds
            assert mine["streambp+offload"].plan is None and mine["streambp+offload"].faster_fits == "streambp"
        else:
            assert not mine["checkpointing"].fits(gpu)
            assert mine["none"].plan is None and mine["none"].exceeds == "checkpointing"
            assert mine["none"].floor_bytes == mine["checkpointing"].plan.peak_bytes
            assert "not planned: more than checkpointing's" in "\n".join(said)
    assert "not planned: streambp fits and is at least as fast" in tables[0]
    assert "not planned: holds more than checkpointing" in tables[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_memory_features_and_layouts_start_the_step_with_the_same_bytes_under_zero(stage):
    """...and no memory feature holds at least what checkpointing does, under every ZeRO stage too
    (the rule :data:`HOLDS_AT_MOST` rests on; at 256 tokens the model state dominates, the case
    where ZeRO-3's gathers in the recomputation could have tipped it)."""
    cfg = _cfg()
    plans = {memory: run_step(layout_config(cfg, 1, 1, stage, memory), world_size=2) for memory in MEMORY_FEATURES}
    starts = {memory: plan.start_bytes for memory, plan in plans.items()}
    for ulysses, ring in ((1, 2), (2, 1)):  # and so does every layout of the stage (ZeRO shards over all ranks)
        starts[(ulysses, ring)] = run_step(layout_config(cfg, ulysses, ring, stage, PLANNED_FIRST), world_size=2).start_bytes
    assert len(set(starts.values())) == 1 and starts["none"] > 0, starts
    assert plans["none"].peak_bytes >= plans["checkpointing"].peak_bytes


def test_plans_leave_the_exception_hook_and_the_collector_as_they_found_them():
    hook = sys.excepthook
    run_step(_cfg(), world_size=2)
    assert sys.excepthook is hook
    assert gc.get_freeze_count() == 0  # a plan freezes the older objects for its own step only


def test_sweep_workers_share_the_cpus():
    assert [worker_threads(jobs, cpus) for jobs, cpus in ((2, 2), (1, 2), (3, 8), (8, 2))] == [1, 2, 2, 1]


@pytest.mark.slow
def test_sweep_command_plans_every_zero_stage(capsys):
    assert plan_cli.main([*SMALL, "--sweep", "--world-size", "2", "--json", "--jobs", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["zero_stage"] for r in doc["rows"]} == {0, 1, 2, 3}
    assert doc["rows"][0]["fits"] and doc["rows"][0]["plan"]["tokens_per_s"] > 0


def test_jobs_only_with_a_sweep(capsys):
    assert plan_cli.main([*SMALL, "--jobs", "2"]) == 2
    assert "--jobs 2: only a --sweep plans in several processes" in capsys.readouterr().err
    assert plan_cli.main([*SMALL, "--sweep", "--jobs", "0"]) == 2
    assert "--jobs: '0' is not a positive integer" in capsys.readouterr().err
