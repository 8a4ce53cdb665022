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
