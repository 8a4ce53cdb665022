"""The parity tolerances (tests/support/parity.py): the step rule, exactness checks, margins."""
from __future__ import annotations

import json

import pytest
import torch

from support.parity import (GRAD_ATOL, LATER_RTOL, STEP1_RTOL, assert_same_curve, assert_same_grads, assert_scalar,
                            step_rtol)


@pytest.fixture(autouse=True)
def _no_margin_log(monkeypatch):
    """These tests exceed the tolerances on purpose: their margins stay out of an audit's log."""
    monkeypatch.delenv("LONGTRAIN_PARITY_LOG", raising=False)


def _curve(*values):
    return [{"step": i + 1, "loss": v, "grad_norm": v, "lr": 1.0} for i, v in enumerate(values)]


def test_step_one_is_tight_and_later_steps_take_the_optimizer_bound():
    assert step_rtol(1) == STEP1_RTOL < LATER_RTOL == step_rtol(2) == step_rtol(7)
    assert_same_curve(_curve(1 + 0.5 * STEP1_RTOL, 1 + 0.5 * LATER_RTOL), _curve(1.0, 1.0))
    with pytest.raises(AssertionError):  # 2e-5 at step 1: a layout error, not rounding
        assert_same_curve(_curve(1 + 2 * STEP1_RTOL, 1.0), _curve(1.0, 1.0))
    with pytest.raises(AssertionError):
        assert_same_curve(_curve(1.0, 1 + 2 * LATER_RTOL), _curve(1.0, 1.0))
    with pytest.raises(AssertionError):  # an explicit rtol holds at every step (exact resumes)
        assert_same_curve(_curve(1.0, 1 + 1e-9), _curve(1.0, 1.0), rtol=1e-12)
    with pytest.raises(AssertionError):  # the steps themselves must match
        assert_same_curve(_curve(1.0), _curve(1.0, 1.0))


def test_gradients_near_zero_take_the_atol():
    ref = {"w": torch.tensor([1.0, 0.0, 1e-3])}
    assert_same_grads({"w": torch.tensor([1.00005, 0.5 * GRAD_ATOL, 1e-3 + 0.5 * GRAD_ATOL])}, ref)
    with pytest.raises(AssertionError):
        assert_same_grads({"w": torch.tensor([1.0, 2 * GRAD_ATOL, 1e-3])}, ref)
    with pytest.raises(AssertionError):  # a missing or extra gradient is an error
        assert_same_grads({"w": ref["w"], "b": torch.zeros(1)}, ref)


def test_margins_are_logged(tmp_path, monkeypatch):
    log = tmp_path / "margins.jsonl"
    monkeypatch.setenv("LONGTRAIN_PARITY_LOG", str(log))
    assert_scalar(1 + 0.25 * LATER_RTOL, 1.0, LATER_RTOL, "loss", 3)
    assert_same_grads({"w": torch.tensor([GRAD_ATOL])}, {"w": torch.tensor([0.0])})
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["kind"], r["what"], r["step"]) for r in rows] == [("later", "loss", 3), ("grads", "grads", 1)]
    assert rows[0]["margin"] == pytest.approx(0.25, rel=1e-6) and rows[1]["margin"] == pytest.approx(1.0, rel=1e-6)
    assert rows[0]["test"].endswith("test_margins_are_logged")
