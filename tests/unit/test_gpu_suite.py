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
import gpu_suite  # noqa: E402
from longtrain.models import get_model_args  # noqa: E402


def test_dry_run_writes_every_stage_to_json_and_markdown(tmp_path):
    """``--device cpu --dry-run``: every stage's plumbing on tiny shapes, JSON and Markdown out."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--device", "cpu", "--dry-run",
                           "--out", str(tmp_path), "--budget", "600"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["meta"]["dry_run"] and result["meta"]["device"] == "cpu"
    stages = result["stages"]
    assert list(stages) == list(gpu_suite.STAGES)
    assert all(s["ok"] for s in stages.values()), {n: s.get("error") or s.get("tail") for n, s in stages.items()}
    assert stages["pytest_gpu"]["fallback_tests"] == {} and stages["pytest_gpu"]["counts"].get("skipped", 0) > 0
    rows = stages["attention"]["rows"]
    assert {(r["impl"], r["docs"]) for r in rows} >= {("sdpa", "none"), ("block", "packed"), ("local", "none")}
    assert all(r["block_backend"] == "cudnn" for r in rows)
    assert {r["layout"] for r in stages["sp_decomposition"]["rows"]} == {"ring", "ulysses"}
    ladder = stages["train_ladder"]
    for mode in ("checkpointing", "streambp", "streambp_offload"):
        assert ladder["summaries"][mode]["max_seq"] == 512 and ladder["summaries"][mode]["tokens_per_s"] > 0
    for mode in ("hf", "liger"):
        assert ladder["runs"][mode]["skipped"] == "the baseline runs on CUDA only"
    assert any(r.get("ok") for r in stages["zero_offload"]["rows"])
    assert stages["moe"]["reference_ms"] > 0 and "grouped_skipped" in stages["moe"]
    assert [r["mode"] for r in stages["plan_check"]["rows"]] == ["checkpointing", "streambp", "streambp_offload"]
    assert set(result["targets"]) == {"decomposition_ratio_ring", "decomposition_ratio_ulysses"}
    md = (tmp_path / "gpu_suite.md").read_text()
    for heading in ("# GPU suite: cpu", "| stage | status | seconds | note |", "## Attention forward + backward",
                    "## Sequence-parallel decomposition", "## Training step ladder (tiny", "## ZeRO optimizer offload",
                    "## MoE experts", "## Targets"):
        assert heading in md
    assert "| block | 256 | packed | 16 | 2 | auto | cudnn |" in md
    print(f"dry run: {time.time() - t0:.1f} s")


def test_a_stage_past_the_budget_is_recorded_as_skipped(tmp_path):
    assert gpu_suite.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path), "--budget", "1",
                           "--stages", "moe"]) == 0
    stage = json.loads((tmp_path / "gpu_suite.json").read_text())["stages"]["moe"]
    assert stage["ok"] is None and stage["skipped"].startswith("budget: 1 s left for it, needs 3 s")
    assert "| moe | skipped |" in (tmp_path / "gpu_suite.md").read_text()


def test_ladder_stops_at_failure_cap_and_budget(capsys):
    spec = dict(start=1024, max=1 << 20, repeats=2, step_cap=30.0)
    steps = {1024: 1.0, 2048: 2.0, 4096: 8.0, 8192: 40.0}
    gpu_suite.ladder("m", lambda mode, seq: dict(ok=True, step_s=steps[seq]), spec, time.time() + 1000)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == [dict(mode="m", seq=8192, ok=None, skipped="predicted step 32.0 s over the per-step cap 30.0 s")]
    gpu_suite.ladder("m", lambda mode, seq: dict(ok=seq < 4096, step_s=1.0), spec, time.time() + 1000)
    assert capsys.readouterr().out == ""                                  # stopped at the failure, quietly
    gpu_suite.ladder("m", lambda mode, seq: dict(ok=True, step_s=steps[seq]), spec, time.time() + 10)
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["seq"] == 4096 and "left" in line["skipped"]             # 2 x 4 s predicted, under 10 s left


def test_summaries_and_targets_against_the_baseline():
    def row(mode, seq, step_s, gib):
        return dict(mode=mode, seq=seq, ok=True, step_s=step_s, tokens_per_s=round(seq / step_s), peak_gib=gib)
    rows = [row("liger", 32768, 2.0, 20.0), row("liger", 65536, 4.0, 40.0), dict(mode="liger", seq=131072, ok=False),
            row("streambp", 32768, 1.0, 20.0), row("streambp", 131072, 4.0, 21.0), row("streambp", 262144, 9.0, 22.0)]
    summaries = {m: gpu_suite.summarise_mode("llama1b", m, rows) for m in ("liger", "streambp")}
    assert summaries["liger"]["max_seq"] == 65536 and summaries["liger"]["stopped_by"] == "failure (OOM)"
    s = summaries["streambp"]
    assert s["bytes_per_token_marginal"] == round(2**30 / 131072) and s["bytes_per_token_peak"] == round(22 * 2**30 / 262144)
    args = get_model_args("llama1b")
    assert s["mfu"] == round(args.flops_per_token(262144) * 262144 / 9.0 / gpu_suite.PEAK_FLOPS, 4)
    targets = gpu_suite.ladder_targets(summaries)
    assert targets["max_seq_vs_liger"] == dict(value=4.0, mode="streambp", target=4.0, passed=True)
    assert targets["bytes_per_token_streambp"]["passed"]                 # 8 KiB a token
    assert targets["tokens_per_s_vs_liger_32k_streambp"] == dict(value=2.0, target=1.4, passed=True)


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
