"""The tolerances of every parity test (a layout, ZeRO stage, StreamBP or accumulation against one
process on the same global batch), from one error model. docs/COMPOSITION.md gives the measurements.

What differs between a parallel run and its single-process reference is the order of fp32 sums
(split reductions, DeepSpeed's flat buckets and norm partitions, blockwise softmax merges, per-chunk
weight gradients), which moves each result by ~1e-7 relative, and which sums change depends on the
CPU's kernels too (ATen's default/AVX2/AVX-512 paths, MKL's per-vendor GEMMs). So:

- **Step 1** (no optimizer step yet: both runs hold the same weights): the loss, the gradient norm
  and the balancing metrics agree to :data:`STEP1_RTOL` (1e-5, measured <= 1e-6 on every kernel
  path: >= 10x margin); gradient entries to :data:`GRAD_RTOL` / :data:`GRAD_ATOL` (entries near 0
  carry the absolute error of their larger summands, hence the atol).
- **Steps >= 2**: the weights differ, and AdamW amplifies the difference. It divides each entry's
  gradient by that entry's own running RMS, so its first update is about ``lr * sign(g)``: an entry
  whose gradient sits at the reordering noise floor (|g| below the absolute error of its sum) can
  move by up to 2 lr the other way in one run, and every later metric feels it. Planting absolute
  noise of 1e-5 of each tensor's RMS in every gradient entry at every step (about 10x what the
  layouts differ by in those units) moved later steps by up to 1.1e-5 relative (gradient norm of
  the MoE model; 4.2e-6 dense, 1.1e-6 on losses), and one AVX-512 machine saw 1.04e-5 at step 3
  between layouts. Later steps are therefore held to :data:`LATER_RTOL` (1e-4): 10x both.
  A flipped top-k routing choice (a router tie within that noise) would move the MoE metrics by
  ~1e-3 and fail: rare (a tie within 1e-6 among ~1e3 tokens per layer), and a real difference.

What the tolerances must still catch (tests/distributed/test_moe_balance.py plants each): a gradient
scaled by 2 (the first step's gradients and norm move by 100%), a wrong balancing scope (router
gradients and balancing loss move by > 1e-3 at step 1), Adam's moments lost after step 1 (steps
>= 2 move by ~1e-3 or more).

A comparison that should be exact (the same run resumed: the same sums in the same order) passes
its own ``rtol`` (1e-12), which then holds at every step.

With ``LONGTRAIN_PARITY_LOG=<file>`` set, every comparison appends its worst margin (difference over
tolerance, so 1.0 is the edge) as a JSON line: ``bench/parity_margins.py`` runs the suite under each
ATen CPU capability with it and tabulates the margins.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Sequence

import torch

STEP1_RTOL = 1e-5
"""Relative tolerance of first-step scalars (loss, gradient norm, balancing metrics)."""
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
"""First-step gradient entries: relative, and absolute for entries near 0."""
LATER_RTOL = 1e-4
"""Relative tolerance of scalars at steps >= 2 (after an optimizer step; module docstring)."""
CURVE_KEYS = ("loss", "grad_norm", "lr")


def step_rtol(step: int) -> float:
    """The relative tolerance of a scalar logged at ``step`` (1-based) of a parity comparison."""
    return STEP1_RTOL if step <= 1 else LATER_RTOL


def _record(kind: str, what: str, step: Optional[int], margin: float) -> None:
    path = os.environ.get("LONGTRAIN_PARITY_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": test, "kind": kind, "what": what, "step": step, "margin": margin}) + "\n")


def assert_scalar(got: float, ref: float, rtol: float, what: str = "", step: Optional[int] = None,
                  atol: float = 0.0) -> None:
    """``|got - ref| <= rtol |ref| + atol`` (``pytest.approx`` with a zero default atol)."""
    bound = rtol * abs(ref) + atol
    diff = abs(got - ref)
    margin = diff / bound if bound > 0 else (0.0 if diff == 0 else float("inf"))
    kind = "exact" if rtol < 1e-9 else ("step1" if step is None or step <= 1 else "later")
    _record(kind, what, step, margin)
    assert margin <= 1.0, (what, step, got, ref, f"rtol {rtol:g}")


def assert_tensors(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], rtol: float, atol: float,
                   what: str = "", _kind: str = "tensors") -> None:
    """Tensors of the same names within ``rtol`` / ``atol`` (``torch.testing.assert_close``), the worst
    margin recorded."""
    assert set(got) == set(ref), (what, sorted(set(got) ^ set(ref)))
    worst = 0.0
    for name, r in ref.items():
        diff = (got[name].double() - r.double()).abs()
        if r.numel():
            worst = max(worst, float((diff / (atol + rtol * r.double().abs())).max()))
        torch.testing.assert_close(got[name], r, rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")
    _record(_kind, what, 1 if _kind == "grads" else None, worst)


def assert_same_grads(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], what: str = "") -> None:
    """Every first-step gradient of ``ref`` is in ``got`` and within GRAD_RTOL / GRAD_ATOL."""
    assert_tensors(got, ref, GRAD_RTOL, GRAD_ATOL, f"{what} grads".strip(), _kind="grads")


def assert_same_step1(got: dict, ref: dict, what: str = "") -> None:
    """The first step's loss and full gradients (a job result with ``loss`` and ``grads``)."""
    assert_scalar(got["loss"], ref["loss"], STEP1_RTOL, f"{what} loss", 1)
    assert_same_grads(got["grads"], ref["grads"], what)


def assert_same_curve(a: Sequence[Dict], b: Sequence[Dict], rtol: Optional[float] = None,
                      keys: Sequence[str] = CURVE_KEYS, atol: float = 0.0) -> None:
    """Two runs' metrics records agree step by step on ``keys``: at :func:`step_rtol` of each record's
    step (``rtol`` None: the error model), or at ``rtol`` at every step (exactness checks)."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for k in keys:
            tol = step_rtol(mb["step"]) if rtol is None else rtol
            assert_scalar(ma[k], mb[k], tol, k, mb["step"], atol=atol)


__all__ = ["CURVE_KEYS", "GRAD_ATOL", "GRAD_RTOL", "LATER_RTOL", "STEP1_RTOL", "assert_same_curve",
           "assert_same_grads", "assert_same_step1", "assert_scalar", "assert_tensors", "step_rtol"]
