"""bench/plan_hf.py: the planner's tracker on transformers' own Llama step, and its Liger stand-in.

The dry run (a tiny Llama at 256 and 1024 tokens) must print one row per (mode, length); the
planned FLOPs must equal the count derived in ``plan_hf.expected_flops`` exactly (the tracker counts
matmuls and attention exactly, so any other number means a kernel path changed: the math SDPA, an
extra recomputation); the fake step must allocate exactly what the same step allocates on real
CPU tensors under the same tracker; and the stand-in's loss and gradients must be cross-entropy's.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from liger_standin import fused_linear_cross_entropy, liger_chunk_size  # noqa: E402


def test_plan_hf_dry_run_prints_both_modes():
    proc = subprocess.run([sys.executable, "bench/plan_hf.py", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["mode"], r["seq"]) for r in rows] == [("hf", 256), ("hf", 1024), ("liger", 256), ("liger", 1024)]
    for r in rows:
        assert r["gpu"] == "h100" and r["planned_peak_gib"] > 0 and r["fits"]
        assert r["planned_tokens_per_s"] > 0 and r["planned_step_s"] > 0 and r["plan_seconds"] >= 0
        assert r["planned_flops"] == r["expected_flops"], r  # exact: see plan_hf.expected_flops
        assert r["flash_backward_workspace_gib"] >= 0 and r["peak_by_kind_gib"]["params"] > 0
    peak = {(r["mode"], r["seq"]): r["planned_peak_bytes"] for r in rows}
    assert peak["liger", 1024] < peak["hf", 1024] / 2  # the full fp32 logits never exist under Liger
    assert rows[3]["liger_chunk_tokens"] == liger_chunk_size(1023, 64, 2048) == 32


@pytest.mark.parametrize("mode", ["hf", "liger"])
def test_fake_plan_allocates_what_the_real_step_does(mode):
    """The same step on real CPU tensors under the same tracker: same peak to the byte, same FLOPs."""
    import plan_hf
    from longtrain.plan.gpus import get_gpu

    gpu = get_gpu("h100")
    fake = plan_hf.plan_point("tiny", mode, 256, gpu, fake=True)
    real = plan_hf.plan_point("tiny", mode, 256, gpu, fake=False)
    assert fake["planned_peak_bytes"] == real["planned_peak_bytes"]
    assert fake["planned_flops"] == real["planned_flops"] == plan_hf.expected_flops("tiny", 256, mode)
    assert fake["flash_backward_workspace_gib"] == real["flash_backward_workspace_gib"]


def test_liger_chunk_size_for_the_1b_shape():
    """Llama-3.2-1B: ceil(128256 / 2048) = 63 chunks' worth of budget, rounded to a power of two."""
    assert [liger_chunk_size(s - 1, 2048, 128256) for s in (16384, 32768, 262144)] == [512, 1024, 8192]
    assert liger_chunk_size(10, 64, 100) == 8 and liger_chunk_size(3, 64, 64) == 3  # never above BT


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_liger_standin_matches_cross_entropy(scale):
    """Loss and both gradients equal cross-entropy's through autograd (several chunks, a partial last
    chunk, ignored labels); an incoming gradient other than 1 scales them. fp32, as Liger keeps its
    loss in fp32 whatever the input: only the order of the sums differs (per-chunk weight-gradient
    sums, per-row losses summed), hence the parity tolerances of fp32 reordering."""
    from support.parity import GRAD_ATOL, GRAD_RTOL, STEP1_RTOL

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g, requires_grad=True)
    w = torch.randn(100, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 100, (300,), generator=g)
    target[::7] = -100
    assert liger_chunk_size(300, 16, 100) == 64  # 5 chunks, the last one partial
    loss = fused_linear_cross_entropy(w, x, target)
    (loss * scale).backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(x_ref @ w_ref.t(), target, ignore_index=-100)
    (ref * scale).backward()
    torch.testing.assert_close(loss, ref, rtol=STEP1_RTOL, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)
