"""The one attention-kernel dispatch (longtrain/kernels/dispatch.py): the backend choice, cuDNN's
probes and fallback, and that every attention caller (local attention, StreamBP chunks, Ulysses,
ring blocks) runs on the kernels it was built with.

On CPU the CUDA ops do not exist: CPU fp32 tensors are taken as CUDA's (the seam the planner uses
for its fake tensors) and the flash varlen and cuDNN ops are replaced by stand-ins of the same
contracts (tests/support/emulated.py). Their numbers on a GPU come from the ``gpu`` tests below and
the GPU suite. Tolerance: the stand-ins compute in fp64 or on the CPU flash op, the reference in
fp32: 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from longtrain.config import ConfigError
from longtrain.kernels import cudnn
from longtrain.kernels.attention import LocalAttention
from longtrain.kernels.blocks import merge_partials, reference_block_backward, reference_block_forward
from longtrain.kernels.dispatch import KERNEL_STATS, AttentionKernels
from support.emulated import EmulatedFlash, emulated_cudnn_ops


def _qkvd(seq_q=48, seq_k=48, hq=4, hkv=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(2, seq_q, hq, dim, generator=gen, dtype=torch.float64).float() for _ in range(2))
    k, v = (torch.randn(2, seq_k, hkv, dim, generator=gen, dtype=torch.float64).float() for _ in range(2))
    return q, k, v, dout


def _on_cpu(backend):
    """Kernels that take CPU fp32 tensors as CUDA's."""
    return AttentionKernels(backend, cuda_device_types=("cpu",), cuda_dtypes=(torch.float32,))


@pytest.fixture
def fresh(monkeypatch):
    """Clean dispatch state; the CUDA ops replaced by their CPU stand-ins."""
    KERNEL_STATS.reset()
    flash = EmulatedFlash()
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", flash.forward, raising=False)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", flash.backward, raising=False)
    monkeypatch.setattr(cudnn, "_ops", emulated_cudnn_ops())
    monkeypatch.setattr("longtrain.kernels.fused._RNG_META", {})
    yield monkeypatch
    KERNEL_STATS.reset()


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


def test_backend_is_validated():
    with pytest.raises(ValueError, match="trainer.attention_backend: choose one of auto, flash, cudnn"):
        AttentionKernels("triton")
    from support.helpers import compose_cfg
    with pytest.raises(ConfigError, match=r"trainer\.attention_backend"):
        compose_cfg(["trainer.attention_backend=triton"])


def test_routes_on_cpu_without_cuda():
    """Real CPU tensors: the CPU flash op where a segment plan exists, the reference elsewhere."""
    kernels = AttentionKernels("cudnn")
    q, k, v, _ = _qkvd()
    idx = torch.arange(48)
    assert kernels.route(q, k, v, idx, idx, None, None, 0.25).path == "cpu"
    assert kernels.route(q.double(), k.double(), v.double(), idx, idx, None, None, 0.25).path == "cpu"
    assert kernels.route(*(t.bfloat16() for t in (q, k, v)), idx, idx, None, None, 0.25).path == "reference"
    assert kernels.route(q, k, v, idx.flip(0), idx.flip(0), None, None, 0.25).path == "fallback"
    assert kernels.whole_sequence(q, k, v, None, None) is None           # the caller runs SDPA


def test_selection_follows_backend_probe_and_timing(fresh):
    q, k, v, _ = _qkvd()
    idx = torch.arange(48)
    calls = []

    def fake_measure(pair, *args, **kwargs):
        calls.append(pair)
        return 1.0 if pair == AttentionKernels._cudnn_pair else 2.0
    fresh.setattr(cudnn, "measure_ms", fake_measure)
    KERNEL_STATS.available["cpu"] = True
    auto = _on_cpu("auto")
    assert auto.route(q, k, v, idx, idx, None, None, 0.25).path == "cudnn"
    assert auto.route(q, k, v, idx, idx, None, None, 0.25).path == "cudnn" and len(calls) == 2  # once per class
    (choice,) = KERNEL_STATS.choices.values()
    assert choice == {"backend": "cudnn", "ms": {"cudnn": 1.0, "flash": 2.0}}
    doc = (idx // 20).expand(2, 48)
    assert auto.route(q, k, v, idx, idx, doc, doc, 0.25).path == "flash"      # not a dense block
    fresh.setattr(cudnn, "measure_ms", lambda pair, *a, **kw: 3.0 if pair == AttentionKernels._cudnn_pair else 2.0)
    assert auto.route(q, k, v, idx + 48, idx, None, None, 0.25).path == "flash"  # a new class, flash faster
    assert _on_cpu("flash").route(q, k, v, idx, idx, None, None, 0.25).path == "flash"
    assert _on_cpu("cudnn").route(q, k, v, idx + 48, idx, None, None, 0.25).path == "cudnn"
    KERNEL_STATS.available["cpu"] = False
    assert _on_cpu("cudnn").route(q, k, v, idx, idx, None, None, 0.25).path == "flash"  # unavailable


def test_probe_failure_disables_cudnn_and_says_why(fresh):
    def broken():
        raise RuntimeError("cuDNN attention is not supported here")
    fresh.setattr(cudnn, "_ops", broken)
    q, k, v, _ = _qkvd()
    idx = torch.arange(48)
    assert _on_cpu("cudnn").route(q, k, v, idx, idx, None, None, 0.25).path == "flash"
    assert "not supported here" in KERNEL_STATS.disabled["cpu"] and KERNEL_STATS.available["cpu"] is False


def test_the_availability_probe_passes_on_agreeing_ops(fresh):
    q, k, v, _ = _qkvd()
    idx = torch.arange(48)
    assert _on_cpu("cudnn").route(q, k, v, idx, idx, None, None, 0.25).path == "cudnn"
    assert KERNEL_STATS.available == {"cpu": True} and not KERNEL_STATS.disabled


def test_a_raising_cudnn_call_falls_back_to_flash(fresh):
    KERNEL_STATS.available["cpu"] = True

    def raising(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: no engine")
    fresh.setattr(cudnn, "_ops", lambda: (raising, raising))
    q, k, v, _ = _qkvd()
    idx = torch.arange(q.shape[1])
    kernels = _on_cpu("cudnn")
    got = kernels.forward(q, k, v, idx, idx, None, None, 0.25)
    want = reference_block_forward(q, k, v, idx, idx, None, None, 0.25)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert KERNEL_STATS.calls["flash"] == 1 and KERNEL_STATS.calls["cudnn"] == 0
    assert "no engine" in KERNEL_STATS.disabled["cpu"]
    assert kernels.route(q, k, v, idx, idx, None, None, 0.25).path == "flash"   # off for good on this device


def test_cudnn_executor_matches_reference_on_a_two_block_ring(fresh):
    """Queries 48..95 over keys 0..47 (full) and 48..95 (causal): merged, then each block's backward
    from the merged out/lse, as ring attention does."""
    kernels = _on_cpu("cudnn")
    q, k, v, dout = _qkvd(seq_k=96)
    q_idx, k_idx = torch.arange(48, 96), torch.arange(96)
    pieces = [(k[:, :48], v[:, :48], k_idx[:48]), (k[:, 48:], v[:, 48:], k_idx[48:])]
    results = {}
    for name, fwd, bwd in (("cudnn", kernels.forward, kernels.backward),
                           ("ref", reference_block_forward, reference_block_backward)):
        parts = [fwd(q, kb, vb, q_idx, ib, None, None, 0.25) for kb, vb, ib in pieces]
        out, lse = merge_partials(*parts[0], *parts[1])
        grads = [bwd(dout, q, kb, vb, out, lse, q_idx, ib, None, None, 0.25) for kb, vb, ib in pieces]
        results[name] = [out, lse, grads[0][0] + grads[1][0], *grads[0][1:], *grads[1][1:]]
    assert KERNEL_STATS.calls["cudnn"] == 4 and KERNEL_STATS.calls["flash"] == 0
    for a, b in zip(results["cudnn"], results["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_every_caller_runs_on_its_kernels(fresh):
    """Local attention (one document: a dense block; packed documents: flash varlen), a StreamBP chunk
    of local attention, a StreamBP chunk under Ulysses and ring attention (one rank each, no process
    group) all run their blocks through the kernels they were built with: cuDNN for the dense blocks,
    flash for packed documents, and equal the reference."""
    from longtrain.parallel.ring import RingAttention
    from longtrain.parallel.ulysses import UlyssesAttention

    kernels = _on_cpu("cudnn")
    local = LocalAttention(kernels)
    q, k, v, _ = _qkvd(seq_q=64, seq_k=64)
    idx = torch.arange(64)
    doc = (idx // 24).expand(2, 64)
    want = {d: reference_block_forward(q, k, v, idx, idx, dd, dd, 0.25)[0] for d, dd in (("one", None), ("packed", doc))}

    def check(name, fn, docs, path):
        before = dict(KERNEL_STATS.calls)
        torch.testing.assert_close(fn(), want[docs], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        added = {p: KERNEL_STATS.calls[p] - before[p] for p in before if KERNEL_STATS.calls[p] != before[p]}
        assert added == {path: 1}, (name, added)

    check("local", lambda: local(q, k, v, scale=0.25), "one", "cudnn")
    check("local, packed", lambda: local(q, k, v, doc_ids=doc, scale=0.25), "packed", "flash")
    check("ring of one", lambda: RingAttention(None, kernels=kernels)(q, k, v, scale=0.25), "one", "cudnn")
    for name, attn in (("local chunk", local), ("ulysses chunk", UlyssesAttention(None, inner=local))):
        keys = attn.chunk_keys(k, v, doc, 0.25, num_heads=4)
        assert keys.kernels is kernels
        chunk = keys.attend(q[:, 40:64], 40, 64, keys.k_bshd[:, :64], keys.v_bshd[:, :64])
        torch.testing.assert_close(chunk, want["packed"][:, 40:], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert KERNEL_STATS.calls["flash"] == 3 and KERNEL_STATS.calls["reference"] == KERNEL_STATS.calls["fallback"] == 0


def test_parallelize_hands_every_layer_the_configured_kernels():
    from longtrain.models import Transformer
    from longtrain.optim.optimizer import build_optimizer
    from longtrain.parallel.dims import ParallelDims
    from longtrain.parallel.parallelize import parallelize
    from longtrain.trainer.build import build_model_args
    from support.helpers import SMALL, compose_cfg

    cfg = compose_cfg(SMALL + ["trainer.attention_backend=flash", "memory.streambp.enabled=true",
                               "memory.streambp.chunk_size=64"])
    dims = ParallelDims(world_size=1, ulysses=1, ring=1)
    dims.build_groups()
    model = Transformer(build_model_args(cfg.model))
    parallelize(model, dims, cfg, build_optimizer(model, cfg.optim, torch.device("cpu")), grad_accum=1,
                device=torch.device("cpu"), bf16=False)
    fns = [m.attn_fn for m in model.modules() if hasattr(m, "attn_fn")]
    assert len(fns) == cfg.model.num_layers and len({id(fn.kernels) for fn in fns}) == 1
    assert fns[0].kernels.backend == "flash"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hkv", [8, 2])
def test_cuda_cudnn_blocks_match_reference_on_a_two_block_ring(hkv):
    """bf16 on CUDA with the ``cudnn`` backend: the full and the diagonal block on cuDNN, merged,
    backward from the merged stats, against the fp32 reference; fails (saying why) if cuDNN was
    switched off."""
    KERNEL_STATS.reset()
    kernels = AttentionKernels("cudnn")
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, 512, 8, 64, generator=gen).cuda().bfloat16() for _ in range(2))
    k, v = (torch.randn(1, 1024, hkv, 64, generator=gen).cuda().bfloat16() for _ in range(2))
    q_idx, k_idx = torch.arange(512, 1024, device="cuda"), torch.arange(1024, device="cuda")
    pieces = [(k[:, :512], v[:, :512], k_idx[:512]), (k[:, 512:], v[:, 512:], k_idx[512:])]
    results = {}
    for name, fwd, bwd, cast in (("cudnn", kernels.forward, kernels.backward, lambda t: t),
                                 ("ref", reference_block_forward, reference_block_backward, lambda t: t.float())):
        parts = [fwd(cast(q), cast(kb), cast(vb), q_idx, ib, None, None, 0.125) for kb, vb, ib in pieces]
        out, lse = merge_partials(*parts[0], *parts[1])
        grads = [bwd(cast(dout), cast(q), cast(kb), cast(vb), out, lse, q_idx, ib, None, None, 0.125)
                 for kb, vb, ib in pieces]
        results[name] = [out, lse, grads[0][0].float() + grads[1][0].float(), *grads[0][1:], *grads[1][1:]]
    assert KERNEL_STATS.calls["cudnn"] == 4, f"cuDNN not used: {KERNEL_STATS.disabled}"
    for label, a, b in zip(["out", "lse", "dq", "dk0", "dv0", "dk1", "dv1"], results["cudnn"], results["ref"]):
        err = (a.float() - b.float()).abs().max().item()
        assert err < 2e-2 * (b.float().abs().max().item() + 1.0), f"{label}: {err:.3g}"
