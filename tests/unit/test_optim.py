"""Chunked LM loss, schedules and optimizer parameter groups."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longtrain.config import OptimConfig
from longtrain.optim.loss import IGNORE_INDEX, chunked_lm_loss
from longtrain.optim.optimizer import build_optimizer
from longtrain.optim.schedule import lr_factor


def _reference(hidden, weight, labels, weights):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    ce = F.cross_entropy(logits, labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX)
    return (ce * weights.reshape(-1)).sum()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_loss_equals_full_logits(dtype, tol, chunk):
    # fp64: exact up to summation order (1e-12); fp32: chunked vs one matmul differ by rounding (1e-5).
    torch.manual_seed(0)
    hidden = torch.randn(3, 29, 24, dtype=dtype, requires_grad=True)
    weight = torch.randn(61, 24, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 61, (3, 29))
    labels[0, :9] = IGNORE_INDEX
    weights = torch.rand(3, 29, dtype=dtype)
    loss = chunked_lm_loss(hidden, weight, labels, weights, chunk_size=chunk)
    (loss * 2.5).backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = _reference(h_ref, w_ref, labels, weights)
    (ref * 2.5).backward()
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 10, 1000])
def test_sequence_reduction_gives_dpo_style_log_prob_sums(dtype, tol, chunk):
    """Per-sequence sums with distinct upstream gradients per sequence (a DPO-like objective)."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 29, 24, dtype=dtype, requires_grad=True)
    weight = torch.randn(61, 24, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 61, (3, 29))
    labels[1, 20:] = IGNORE_INDEX
    weights = torch.rand(3, 29, dtype=dtype)
    upstream = torch.tensor([1.5, -0.5, 2.0], dtype=dtype)
    per_seq = chunked_lm_loss(hidden, weight, labels, weights, chunk_size=chunk, reduction="sequence")
    (per_seq * upstream).sum().backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = torch.stack([_reference(h_ref[b], w_ref, labels[b], weights[b]) for b in range(3)])
    (ref * upstream).sum().backward()
    assert per_seq.shape == (3,)
    torch.testing.assert_close(per_seq, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="reduction"):
        chunked_lm_loss(hidden, weight, labels, reduction="mean")


def test_chunked_loss_masks_and_no_grad():
    hidden = torch.randn(10, 8)
    weight = torch.randn(5, 8)
    labels = torch.full((10,), IGNORE_INDEX)
    assert chunked_lm_loss(hidden, weight, labels).item() == 0.0
    with pytest.raises(ValueError, match="labels hold"):
        chunked_lm_loss(hidden, weight, labels[:3])


def test_schedules():
    cos = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cos, 100) == pytest.approx(0.1)
    assert lr_factor(9, cos, 100) == pytest.approx(1.0)
    assert lr_factor(55, cos, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, cos, 100) == pytest.approx(0.1)
    wsd = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_factor(s, wsd, 100) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(80, wsd, 100) < 1.0 and lr_factor(99, wsd, 100) == pytest.approx(0.0)
    factors = [lr_factor(s, wsd, 100) for s in range(80, 100)]
    assert factors == sorted(factors, reverse=True)
    const = OptimConfig(schedule="constant", warmup_steps=0)
    assert lr_factor(77, const, 100) == 1.0


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


@pytest.mark.parametrize("key, value", [("lr", -1.0), ("schedule", "linear"), ("fused", "maybe")])
def test_bad_optim_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"optim.{key}"):
        OptimConfig(**{key: value})
