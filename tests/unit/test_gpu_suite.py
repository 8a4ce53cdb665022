"""The GPU validation suite's CPU dry run, and the cuDNN block backend's selection and fallback.

On CPU the cuDNN ops do not exist: the tests here check the selection logic (the availability
probe and the timing probe are stood in for), the fallback to the flash kernels when cuDNN raises,
and the cuDNN executor's plumbing (layouts, GQA expansion, lse shape, backward from merged stats)
against the reference with the CPU flash op standing in for the cuDNN op. Their numbers on a GPU
come from the ``gpu``-marked suite stage (``bench/gpu_suite.py``).
"""
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

from longtrain.kernels import blocks, cudnn
from longtrain.kernels.blocks import merge_partials, reference_block_backward, reference_block_forward
from longtrain.kernels.fused import fused_block_forward

REPO = Path(__file__).resolve().parents[2]


def _qkvd(seq_q=48, seq_k=48, hq=4, hkv=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(2, seq_q, hq, dim, generator=gen, dtype=torch.float64).float() for _ in range(2))
    k, v = (torch.randn(2, seq_k, hkv, dim, generator=gen, dtype=torch.float64).float() for _ in range(2))
    return q, k, v, dout


@pytest.fixture
def fresh(monkeypatch):
    """Clean cuDNN state; the cuDNN kernels registered for CPU tensors and deemed eligible."""
    monkeypatch.setattr(cudnn, "CUDNN_STATS", cudnn.CudnnStats())
    monkeypatch.setattr(cudnn, "_AVAILABLE", {})
    monkeypatch.setattr(cudnn, "eligible", lambda q: True)
    monkeypatch.delenv(cudnn.BACKEND_ENV, raising=False)
    saved = dict(blocks._BACKENDS)
    blocks.register_block_kernels("cpu", cudnn.cudnn_block_forward, cudnn.cudnn_block_backward)
    yield monkeypatch
    blocks._BACKENDS.clear()
    blocks._BACKENDS.update(saved)


def _emulated_ops():
    """The cuDNN ops' signatures on the CPU flash op (lse [B, H, S, 1] as cuDNN returns it)."""
    def forward(q, k, v, bias, lse_flag, p, causal, debug, *, scale):
        assert bias is None and lse_flag and p == 0.0 and q.shape[1] == k.shape[1]  # GQA expanded
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, scale=scale)
        empty = torch.empty(())
        return out, lse.unsqueeze(-1), None, None, q.shape[2], k.shape[2], empty, empty, None

    def backward(dout, q, k, v, out, lse, seed, offset, bias, cu_q, cu_k, max_q, max_k, p, causal, *, scale):
        assert lse.shape == (*q.shape[:3], 1) and max_q == q.shape[2] and max_k == k.shape[2]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
            lse.squeeze(-1).contiguous(), 0.0, causal, scale=scale)
    return lambda: (forward, backward)


def test_dense_kind_names_the_blocks_cudnn_takes():
    idx = torch.arange(8)
    assert cudnn.dense_kind(idx, idx, None, None) == "causal"
    assert cudnn.dense_kind(idx + 8, idx, None, None) == "full"
    zigzag = torch.cat([torch.arange(4), torch.arange(12, 16)])
    assert cudnn.dense_kind(zigzag, zigzag, None, None) == "causal"
    assert cudnn.dense_kind(idx, idx + 4, None, None) is None           # partial diagonal
    assert cudnn.dense_kind(idx.flip(0), idx.flip(0), None, None) is None
    doc = torch.zeros(1, 8, dtype=torch.long)
    assert cudnn.dense_kind(idx, idx, doc, doc) is None                 # documents: flash varlen


def test_backend_switch_is_validated(monkeypatch):
    monkeypatch.setenv(cudnn.BACKEND_ENV, "CuDNN")
    assert cudnn.requested_backend() == "cudnn"
    monkeypatch.setenv(cudnn.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="auto, flash, cudnn"):
        cudnn.requested_backend()


def test_selection_follows_switch_probe_and_timing(fresh):
    q, k, v, _ = _qkvd()
    calls = []

    def fake_measure(pair, *args, **kwargs):
        calls.append(pair)
        return 1.0 if pair is cudnn._cudnn_pair else 2.0
    fresh.setattr(cudnn, "measure_ms", fake_measure)
    fresh.setattr(cudnn, "cudnn_available", lambda device: True)
    assert cudnn.choose_backend(q, k, v, "causal", 0.25) == "cudnn"
    assert cudnn.choose_backend(q, k, v, "causal", 0.25) == "cudnn" and len(calls) == 2  # once per class
    (choice,) = cudnn.CUDNN_STATS.choices.values()
    assert choice == {"backend": "cudnn", "ms": {"cudnn": 1.0, "flash": 2.0}}
    assert cudnn.choose_backend(q, k, v, None, 0.25) == "flash"          # not a dense block
    fresh.setattr(cudnn, "measure_ms", lambda pair, *a, **k: 3.0 if pair is cudnn._cudnn_pair else 2.0)
    assert cudnn.choose_backend(q, k, v, "full", 0.25) == "flash"        # a new class, flash faster
    fresh.setenv(cudnn.BACKEND_ENV, "flash")
    assert cudnn.choose_backend(q, k, v, "causal", 0.25) == "flash"
    fresh.setenv(cudnn.BACKEND_ENV, "cudnn")
    assert cudnn.choose_backend(q, k, v, "full", 0.25) == "cudnn"
    fresh.setattr(cudnn, "cudnn_available", lambda device: False)
    assert cudnn.choose_backend(q, k, v, "full", 0.25) == "flash"        # unavailable: flash, whatever asked


def test_probe_failure_disables_cudnn_and_says_why(fresh):
    def broken():
        raise RuntimeError("cuDNN attention is not supported here")
    fresh.setattr(cudnn, "_ops", broken)
    assert not cudnn.cudnn_available(torch.device("cpu"))
    assert "not supported here" in cudnn.CUDNN_STATS.disabled["cpu"]


def test_a_raising_cudnn_call_falls_back_to_flash(fresh):
    fresh.setenv(cudnn.BACKEND_ENV, "cudnn")
    fresh.setattr(cudnn, "_AVAILABLE", {"cpu": True})

    def raising(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: no engine")
    fresh.setattr(cudnn, "_ops", lambda: (raising, raising))
    q, k, v, _ = _qkvd()
    idx = torch.arange(q.shape[1])
    got = blocks.block_attention_forward(q, k, v, idx, idx, None, None, 0.25)
    want = fused_block_forward(q, k, v, idx, idx, None, None, 0.25)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert cudnn.CUDNN_STATS.flash == 1 and cudnn.CUDNN_STATS.cudnn == 0
    assert "no engine" in cudnn.CUDNN_STATS.disabled["cpu"]
    assert not cudnn.cudnn_available(torch.device("cpu"))                 # off for good on this device


def test_cudnn_executor_matches_reference_on_a_two_block_ring(fresh):
    """Queries 48..95 over keys 0..47 (full) and 48..95 (causal): merged, then each block's backward
    from the merged out/lse, as ring attention does; the emulated op stands in for cuDNN."""
    fresh.setenv(cudnn.BACKEND_ENV, "cudnn")
    fresh.setattr(cudnn, "_AVAILABLE", {"cpu": True})
    fresh.setattr(cudnn, "_ops", _emulated_ops())
    q, k, v, dout = _qkvd(seq_k=96)
    q_idx, k_idx = torch.arange(48, 96), torch.arange(96)
    pieces = [(k[:, :48], v[:, :48], k_idx[:48]), (k[:, 48:], v[:, 48:], k_idx[48:])]
    results = {}
    for name, fwd, bwd in (("cudnn", blocks.block_attention_forward, blocks.block_attention_backward),
                           ("ref", reference_block_forward, reference_block_backward)):
        parts = [fwd(q, kb, vb, q_idx, ib, None, None, 0.25) for kb, vb, ib in pieces]
        out, lse = merge_partials(*parts[0], *parts[1])
        grads = [bwd(dout, q, kb, vb, out, lse, q_idx, ib, None, None, 0.25) for kb, vb, ib in pieces]
        results[name] = [out, lse, grads[0][0] + grads[1][0], *grads[0][1:], *grads[1][1:]]
    assert cudnn.CUDNN_STATS.cudnn == 4 and cudnn.CUDNN_STATS.flash == 0
    for a, b in zip(results["cudnn"], results["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_packed_documents_stay_on_flash(fresh):
    fresh.setenv(cudnn.BACKEND_ENV, "cudnn")
    fresh.setattr(cudnn, "_AVAILABLE", {"cpu": True})
    fresh.setattr(cudnn, "_ops", _emulated_ops())
    q, k, v, _ = _qkvd()
    idx = torch.arange(48)
    doc = (idx // 20).expand(2, 48)
    blocks.block_attention_forward(q, k, v, idx, idx, doc, doc, 0.25)
    assert cudnn.CUDNN_STATS.flash == 1 and cudnn.CUDNN_STATS.cudnn == 0


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
        "from longtrain.kernels.fused import fused_block_forward\n"
        "def test_out_of_order():\n"
        "    q = torch.randn(1, 8, 2, 16)\n"
        "    idx = torch.arange(8).flip(0)\n"
        "    fused_block_forward(q, q, q, idx, idx, None, None, 0.25)\n"
        "def test_in_order():\n"
        "    q = torch.randn(1, 8, 2, 16)\n"
        "    fused_block_forward(q, q, q, torch.arange(8), torch.arange(8), None, None, 0.25)\n")
    report = tmp_path / "fallbacks.json"
    monkeypatch.setenv("LONGTRAIN_FALLBACK_REPORT", str(report))
    import fallback_guard
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(tmp_path),
                      str(tmp_path / "test_fb.py")], plugins=[fallback_guard])
    out = capsys.readouterr().out
    assert rc == 1 and "1 failed, 1 passed" in out, out[-2000:]
    assert "FALLBACK: 1 block kernel call(s)" in out
    assert json.loads(report.read_text()) == {"test_fb.py::test_out_of_order": 1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hkv", [8, 2])
def test_cuda_cudnn_blocks_match_reference_on_a_two_block_ring(monkeypatch, hkv):
    """bf16 on CUDA with ``LONGTRAIN_ATTN_BACKEND=cudnn``: the full and the diagonal block on
    cuDNN, merged, backward from the merged stats, against the fp32 reference; fails (saying why)
    if cuDNN was switched off."""
    monkeypatch.setenv(cudnn.BACKEND_ENV, "cudnn")
    monkeypatch.setattr(cudnn, "CUDNN_STATS", cudnn.CudnnStats())
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, 512, 8, 64, generator=gen).cuda().bfloat16() for _ in range(2))
    k, v = (torch.randn(1, 1024, hkv, 64, generator=gen).cuda().bfloat16() for _ in range(2))
    q_idx, k_idx = torch.arange(512, 1024, device="cuda"), torch.arange(1024, device="cuda")
    pieces = [(k[:, :512], v[:, :512], k_idx[:512]), (k[:, 512:], v[:, 512:], k_idx[512:])]
    results = {}
    for name, fwd, bwd, cast in (("cudnn", blocks.block_attention_forward, blocks.block_attention_backward,
                                  lambda t: t),
                                 ("ref", reference_block_forward, reference_block_backward, lambda t: t.float())):
        parts = [fwd(cast(q), cast(kb), cast(vb), q_idx, ib, None, None, 0.125) for kb, vb, ib in pieces]
        out, lse = merge_partials(*parts[0], *parts[1])
        grads = [bwd(cast(dout), cast(q), cast(kb), cast(vb), out, lse, q_idx, ib, None, None, 0.125)
                 for kb, vb, ib in pieces]
        results[name] = [out, lse, grads[0][0].float() + grads[1][0].float(), *grads[0][1:], *grads[1][1:]]
    assert cudnn.CUDNN_STATS.cudnn == 4, f"cuDNN not used: {cudnn.CUDNN_STATS.disabled}"
    for label, a, b in zip(["out", "lse", "dq", "dk0", "dv0", "dk1", "dv1"], results["cudnn"], results["ref"]):
        err = (a.float() - b.float()).abs().max().item()
        assert err < 2e-2 * (b.float().abs().max().item() + 1.0), f"{label}: {err:.3g}"
