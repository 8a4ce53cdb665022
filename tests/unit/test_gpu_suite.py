"""The GPU validation suite (bench/gpu_suite.py): its CPU dry run and its pieces."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- the suite
sys.path.insert(0, str(REPO / "bench"))
import gpu_report  # noqa: E402
import gpu_stages  # noqa: E402
import gpu_suite  # noqa: E402
from longtrain.models import get_model_args  # noqa: E402


def _tree_state():
    """Every file of the checkout git would see (tracked, or untracked and not ignored), with its status."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout


def test_dry_run_writes_every_stage_to_json_and_markdown_and_nothing_else(tmp_path):
    """``--device cpu --dry-run``: every stage in the GPU call's order, tiny shapes, JSON and Markdown
    out; the folder holds the three outputs only and the checkout is left as it was."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    before = _tree_state()
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--device", "cpu", "--dry-run",
                           "--out", str(out), "--budget", "600"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_suite.OUTPUTS)
    assert _tree_state() == before
    result = json.loads((out / "gpu_suite.json").read_text())
    assert result["meta"]["dry_run"] and result["meta"]["device"] == "cpu"
    stages = result["stages"]
    assert list(stages) == ["smoke", "plan", "speed", "kernels", "pytest_gpu", "moe", "zero_offload", "eight_b"]
    assert all(s["ok"] for s in stages.values()), {n: s.get("error") or s.get("tail") for n, s in stages.items()}
    smoke = stages["smoke"]
    assert {(r["mode"], r["backend"]) for r in smoke["rows"]} == {
        (m, b) for m in ("none", "checkpointing", "streambp", "streambp_offload") for b in ("flash", "cudnn")}
    assert all(len(r["loss"]) == 3 for r in smoke["rows"]) and smoke["agree"]
    plan = stages["plan"]
    assert sorted((r["layers"], r["mode"], r["seq"]) for r in plan["rows"]) == sorted(
        (t["layers"], t["mode"], t["seq"]) for t in gpu_stages.plan_trials(True))
    assert all(r["ok"] and r["planned_gib"] > 0 and r["step_s"] > 0 for r in plan["rows"])
    assert {r["mode"] for r in stages["speed"]["rows"]} == set(gpu_stages.FULL_MODES)
    assert stages["speed"]["baseline"]["skipped"] == "the baseline runs on CUDA only"
    kernels = stages["kernels"]
    assert {(r["impl"], r["docs"], r["block_backend"]) for r in kernels["rows"]} == {
        (i, d, b) for i in ("sdpa", "local", "block") for d in ("none", "packed") for b in ("flash", "cudnn")}
    assert all(r["max_err"] <= kernels["tolerance"] for r in kernels["rows"] if r["impl"] != "sdpa")
    assert {r["layout"] for r in kernels["decomposition"]} == {"ring", "ulysses"}
    assert stages["pytest_gpu"]["fallback_tests"] == {} and stages["pytest_gpu"]["counts"].get("skipped", 0) > 0
    assert stages["moe"]["reference_ms"] > 0 and "grouped_skipped" in stages["moe"]
    assert any(r.get("ok") for r in stages["zero_offload"]["rows"])
    eight_b = stages["eight_b"]  # the trainer at the recipe's layout, each trial planned before it ran
    assert [(r["layers"], r["seq"]) for r in eight_b["rows"]] == [(t["layers"], t["seq"])
                                                                   for t in gpu_stages.eight_b_trials(True)]
    assert all(r["ok"] and r["planned_gib"] > 0 and r["peak_gib"] > 0 for r in eight_b["rows"])
    assert {"smoke_modes_agree", "attention_max_err_vs_sdpa", "decomposition_ratio_ring"} <= set(result["targets"])
    md = (out / "gpu_suite.md").read_text()
    for heading in ("# GPU suite: cpu", "| stage | status | seconds | note |", "## Smoke: every mode trains on CUDA",
                    "## The planner against the GPU (h100)", "## Speed against HF", "## Attention forward + backward",
                    "## MoE experts", "## ZeRO optimizer offload", "## Llama-3.1-8B, one GPU", "## Targets"):
        assert heading in md


def test_a_stage_past_the_budget_is_recorded_as_skipped(tmp_path):
    assert gpu_suite.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path), "--budget", "1",
                           "--stages", "moe"]) == 0
    stage = json.loads((tmp_path / "gpu_suite.json").read_text())["stages"]["moe"]
    assert stage["ok"] is None and stage["skipped"].startswith("budget: 1 s left for it, needs 3 s")
    assert "| moe | skipped |" in (tmp_path / "gpu_suite.md").read_text()


def test_plan_comparison_depth_check_and_targets():
    """Planned against measured: the peak and time ratios, the depth check from 2 to 4 layers, and the
    targets with their pass flags (a planned depth step 10% off the measured one fails)."""
    def row(layers, seq, planned, measured, step=(10.0, 9.0)):
        return dict(layers=layers, mode="streambp_offload", seq=seq, ok=True, planned_gib=planned, peak_gib=measured,
                    peak_ratio=round(planned / measured, 4), planned_step_s=step[0], step_s=step[1],
                    time_ratio=round(step[0] / step[1], 4))
    rows = [row(2, 262144, 10.0, 10.2), row(4, 262144, 12.0, 12.29), row(2, 524288, 20.0, 20.0),
            row(4, 524288, 24.4, 24.0, step=(10.0, 5.0))]
    depth = gpu_stages.depth_check(rows)
    assert [(d["seq"], d["layers"], d["within"]) for d in depth] == [(262144, (2, 4), True), (524288, (2, 4), False)]
    assert abs(depth[0]["ratio"] - 2.0 / 2.09) < 1e-3
    t = gpu_report.targets({"plan": dict(rows=rows, depth=depth)})
    assert t["plan_peak_L4_streambp_offload_256K"]["passed"] and not t["plan_time_L4_streambp_offload_512K"]["passed"]
    assert not t["plan_depth_512K_L2_to_L4"]["passed"]


def test_the_8b_stage_skips_what_the_host_cannot_hold_and_compares_the_rest(tmp_path, monkeypatch):
    """A trial whose plan needs more host memory than the host has is skipped with both figures; one
    that runs is compared with its plan (peak ratio and target), without another process here."""
    import argparse

    import gpu_plans

    trials = gpu_stages.eight_b_trials(False)
    assert [(t["layers"], t["seq"]) for t in trials] == [(2, 262144), (4, 262144), (2, 524288), (2, 1048576)]
    plans = {gpu_plans.recipe_key("h100", t): dict(planned_gib=40.0, planned_step_s=1.0,
                                                   planned_host_gib=1e6 if t["seq"] > 262144 else 1.0) for t in trials}
    ran = []

    def child(kind, spec, timeout, log):
        ran.append(spec["trial"])
        return dict(rows=[dict(spec["trial"], ok=True, peak_gib=41.0, step_s=1.2)], rc=0, timed_out=False)

    import psutil

    monkeypatch.setattr(gpu_stages, "child", child)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: argparse.Namespace(available=200 * 2**30, total=256 * 2**30))
    ctx = dict(gpu="h100", plans=lambda wait=False, timeout=60: plans, cpu_adam=lambda: {})
    with open(tmp_path / "log", "w") as log:
        stage = gpu_stages.stage_eight_b(argparse.Namespace(dry_run=False, device="cuda"), 600, log, ctx)
    assert ran == [dict(layers=2, seq=262144), dict(layers=4, seq=262144)]
    skipped = [r for r in stage["rows"] if r.get("skipped")]
    assert len(skipped) == 2 and all(r["skipped"].startswith("host has") and "host has 200 GiB available, the plan needs 1000024" in r["skipped"]
                                     for r in skipped)
    assert stage["ok"] and stage["peak_within"] and stage["rows"][0]["peak_ratio"] == round(40 / 41, 4)
    assert gpu_report.targets({"eight_b": stage})["plan_peak_8b_L2_256K"]["passed"]


def test_speed_ratios_against_the_baseline_of_the_same_call(monkeypatch):
    from types import SimpleNamespace

    measured = [dict(layers=16, mode="streambp", seq=32768, ok=True, step_s=1.0, tokens_per_s=32768),
                dict(layers=2, mode="streambp_offload", seq=262144, ok=True, step_s=5.0, tokens_per_s=52429)]
    liger = [dict(mode="liger", seq=32768, ok=True, step_s=2.0, tokens_per_s=16384, peak_gib=30.0)]
    monkeypatch.setattr(gpu_stages, "child", lambda kind, spec, timeout, log: dict(rows=liger, rc=0, timed_out=False,
                                                                                 tail=""))
    a = SimpleNamespace(shape="llama1b", device="cuda", dry_run=False)
    stage = gpu_stages.stage_speed(a, 100, None, dict(measured=measured, baseline=Path("hf_baseline.py")))
    ours = [r for r in stage["rows"] if r["mode"] == "streambp"]
    assert ours == [dict(mode="streambp", seq=32768, tokens_per_s=32768, liger_tokens_per_s=16384, ratio=2.0,
                         mfu=round(get_model_args("llama1b").flops_per_token(32768) * 32768 / 1.0 / 989e12, 4))]
    assert stage["passed"] and stage["ok"] and {r["mode"] for r in stage["rows"]} == {"streambp", "hf+liger"}


def test_fallback_guard_fails_a_test_whose_fused_kernels_fell_back(tmp_path, monkeypatch, capsys):
    (tmp_path / "test_fb.py").write_text(
        "import torch\n"
        "from longtrain.kernels.dispatch import AttentionKernels\n"
        "kernels = AttentionKernels('flash')\n"
        "def test_out_of_order():\n"
        "    q = torch.randn(1, 8, 2, 16)\n"
        "    idx = torch.arange(8).flip(0)\n"
        "    kernels.forward(q, q, q, idx, idx, None, None, 0.25)\n"
        "def test_in_order():\n"
        "    q = torch.randn(1, 8, 2, 16)\n"
        "    kernels.forward(q, q, q, torch.arange(8), torch.arange(8), None, None, 0.25)\n"
        "def test_no_fused_executor_for_the_dtype():\n"
        "    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)\n"
        "    idx = torch.arange(8).flip(0)\n"
        "    kernels.forward(q, q, q, idx, idx, None, None, 0.25)\n")
    report = tmp_path / "fallbacks.json"
    monkeypatch.setenv("LONGTRAIN_FALLBACK_REPORT", str(report))
    import fallback_guard
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(tmp_path),
                      str(tmp_path / "test_fb.py")], plugins=[fallback_guard])
    out = capsys.readouterr().out
    assert rc == 1 and "1 failed, 2 passed" in out, out[-2000:]
    assert "FALLBACK: 1 attention block(s)" in out
    assert json.loads(report.read_text()) == {"test_fb.py::test_out_of_order": 1}
