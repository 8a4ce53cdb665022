"""Benchmark scripts stay runnable: a CPU smoke run of each prints well-formed JSON lines."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_train_step_bench_prints_json():
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--shape", "tiny", "--start", "256", "--max", "512",
                           "--repeats", "1", "--modes", "checkpointing", "none"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["mode"], r["seq"], r["ok"]) for r in rows] == [("checkpointing", 256, True), ("checkpointing", 512, True),
                                                              ("none", 256, True), ("none", 512, True)]
    assert all(r["tokens_per_s"] > 0 for r in rows)


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
