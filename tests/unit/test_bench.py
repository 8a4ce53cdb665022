"""Benchmark scripts stay runnable: a CPU smoke run of each prints well-formed JSON lines."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_step_bench_prints_json():
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--shape", "tiny", "--start", "256", "--max", "512",
                           "--repeats", "1", "--modes", "checkpointing", "none"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["mode"], r["seq"], r["ok"]) for r in rows] == [("checkpointing", 256, True), ("checkpointing", 512, True),
                                                              ("none", 256, True), ("none", 512, True)]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_streambp_compare_bench_summarises():
    proc = subprocess.run([sys.executable, "bench/streambp_compare.py", "--shape", "tiny", "--start", "256",
                           "--max", "512", "--streambp-chunk", "100", "--repeats", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    trials = [r for r in rows if "seq" in r]
    assert {(r["mode"], r["seq"]) for r in trials if r["ok"]} == {
        (m, s) for m in ("streambp", "streambp_offload", "checkpointing") for s in (256, 512)}
    summaries = {r["mode"]: r for r in rows if r.get("summary")}
    assert set(summaries) == {"streambp", "streambp_offload", "checkpointing"}
    assert all(s["max_seq"] == 512 for s in summaries.values())
    assert rows[-1]["targets"] is True


def test_zero_memory_bench_prints_json():
    proc = subprocess.run([sys.executable, "bench/zero_memory.py", "--shapes", "tiny", "--modes", "stage0", "zero2",
                           "--seq", "256", "--steps", "2", "--device", "cpu", "--largest"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    trials = [r for r in rows if "ok" in r]
    assert [(r["mode"], r["ok"]) for r in trials] == [("stage0", True), ("zero2", True)], rows
    assert all(r["step_s"] > 0 and r["peak_mem_gib"] > 0 for r in trials)
    assert trials[1]["memory_report"]["stage"] == 2 and "memory_report" not in trials[0]
    assert [r["largest_shape_that_trains"] for r in rows if "largest_shape_that_trains" in r] == ["tiny", "tiny"]


def test_passkey_learning_bench_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "bench/passkey_learning.py", "--dry-run", "--nproc", "1",
                           "--run-dir", str(tmp_path / "run"), f"data.cache_dir={tmp_path / 'cache'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["steps"] == 4 and 0.0 <= result["passkey_acc"] <= 1.0 and result["wall_s"] > 0
    assert set(result["passkey_acc_by_depth"]) == {"0-20", "20-40", "40-60", "60-80", "80-100"}
    assert result["needle"]["lengths"] == [512, 1024] and len(result["load_before"]) == 3
    assert (tmp_path / "run" / "plots" / "needle.png").is_file()


def test_plan_tables_dry_run_prints_a_row():
    """bench/plan_tables.py (the docs/PLANNING.md tables) on the tiny model and a 24 MiB GPU."""
    proc = subprocess.run([sys.executable, "bench/plan_tables.py", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["max_seq"] > 0 and row["peak_gib"] * 2**30 <= 24 << 20
    assert row["marginal_bytes_per_token"] > 0 and row["host_gib"] > 0


def test_plan_speed_dry_run_times_a_plan():
    """bench/plan_speed.py (the planner's timing targets) runs longtrain-plan in a process and reads its JSON."""
    proc = subprocess.run([sys.executable, "bench/plan_speed.py", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["rc"] == 0 and row["fits"] is True and 0 < row["peak_gib"] and row["seconds"] > 0, row


def test_gpu_plans_dry_run_plans_each_trial(tmp_path):
    """bench/gpu_plans.py (the plans the GPU suite compares with the device) plans every dry-run trial
    without a GPU, the 8B stage's recipe trials too, keyed as the suite looks them up, and keeps what
    the file already holds."""
    import sys as _sys
    _sys.path.insert(0, str(REPO / "bench"))
    from gpu_plans import plan_key, recipe_key
    from gpu_stages import eight_b_trials, plan_trials

    out = tmp_path / "plans.json"
    out.write_text(json.dumps({"kept": {"planned_gib": 1.0}}))
    proc = subprocess.run([sys.executable, "bench/gpu_plans.py", "--dry-run", "--gpus", "h100", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = json.loads(out.read_text())
    recipes = {recipe_key("h100", t) for t in eight_b_trials(True)}
    assert set(plans) == {"kept"} | {plan_key("h100", t) for t in plan_trials(True)} | recipes
    assert all(p["planned_gib"] > 0 and p["planned_tokens_per_s"] > 0 for k, p in plans.items()
               if k != "kept" and k not in recipes)
    assert all(plans[k]["planned_gib"] > 0 and plans[k]["planned_host_gib"] >= 0 for k in recipes)


def test_parity_margins_bench_tabulates_a_capability():
    """bench/parity_margins.py under ATEN_CPU_CAPABILITY=default on one fast parity test: the capability
    torch ran with, pytest's outcome and the worst margins the comparisons recorded."""
    test = "tests/unit/test_moe.py::test_tiny_moe_trains_two_steps"
    proc = subprocess.run([sys.executable, "bench/parity_margins.py", "--caps", "default", "--", test], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    res = out["results"]["default"]
    assert res["capability"] == "DEFAULT" and res["returncode"] == 0 and res["failed"] == []
    margins = res["tests"][test]
    assert set(margins) == {"step1", "later"} and all(0 <= m <= 1 for m in margins.values())
    assert out["worst"]["later"]["test"] == test
