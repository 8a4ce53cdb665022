"""StreamBP's streamed layer backward against ordinary backprop.

Tolerances: the streamed backward computes the same sums in another order (per chunk, then the
K/V projections separately), so in fp64 it agrees to ~1e-14 relative; 1e-10 is checked. In fp32
the reordering gives ~1e-6; 1e-5 is checked. A dropped chunk, a missing prefix key or a wrong
diagonal moves gradients by 1e-2 or more.
"""
from __future__ import annotations

import pytest
import torch

from longtrain.kernels.attention import local_attention
from longtrain.memory.streambp import is_streamable, streamed_layer
from longtrain.models import Transformer
from longtrain.models.registry import get_model_args

B, S = 2, 40
DOCS = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [0] * 25 + [1] * 1 + [2] * 14])
MODELS = {"gqa": dict(num_heads=4, num_kv_heads=2), "mha": dict(num_heads=4, num_kv_heads=4),
          "qwen3": dict(num_heads=4, num_kv_heads=1, qk_norm=True)}


def _layer_and_inputs(model: str, dtype: torch.dtype):
    torch.manual_seed(0)
    args = get_model_args("tiny", num_layers=1, hidden_size=64, intermediate_size=96, **MODELS[model])
    net = Transformer(args)
    net.init_weights()
    net.to(dtype)
    for p in net.parameters():  # non-trivial norm weights, so their gradients are checked too
        p.data.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, args.hidden_size, generator=gen, dtype=torch.float64).to(dtype)
    dout = torch.randn(B, S, args.hidden_size, generator=gen, dtype=torch.float64).to(dtype)
    cos, sin = net.rope(torch.arange(S).expand(B, S), dtype)
    return net.layers[0], x, dout, cos, sin


def _grads(layer, x, out, dout):
    params = list(layer.parameters())
    grads = torch.autograd.grad(out, [x, *params], dout)
    return dict(zip(["x"] + [n for n, _ in layer.named_parameters()], grads))


def _distributed_attention(q, k, v, doc_ids=None, scale=None):
    """Stands for ring attention: an attention function without ``chunk_keys`` makes the streamed
    backward run the attention core whole and stream the rest (longtrain/memory/two_pass.py)."""
    return local_attention(q, k, v, doc_ids=doc_ids, scale=scale)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("chunk", [40, 16, 7, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("attention", ["local", "distributed"])
def test_streamed_gradients_equal_backprop(model, docs, chunk, dtype, tol, attention):
    layer, x, dout, cos, sin = _layer_and_inputs(model, dtype)
    if attention == "distributed":
        layer.self_attn.attn_fn = _distributed_attention
        assert not is_streamable(layer)
    doc_ids = DOCS if docs else None
    x_ref = x.clone().requires_grad_()
    want = _grads(layer, x_ref, layer(x_ref, cos, sin, doc_ids), dout)
    x_got = x.clone().requires_grad_()
    out = streamed_layer(layer, x_got, cos, sin, doc_ids, chunk)
    # the forward runs the MLP chunk by chunk too: the same function, rounded per chunk's matmuls
    assert ((out - layer(x, cos, sin, doc_ids)).abs().max() / out.abs().max()).item() < tol
    got = _grads(layer, x_got, out, dout)
    for name, g in want.items():
        err = ((got[name] - g).abs().max() / g.abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.3g}"


def test_a_streamed_backward_that_drops_the_prefix_is_caught(monkeypatch):
    """The comparison can fail: keys before the chunk left out of each chunk's attention."""
    from longtrain.kernels.dispatch import AttentionKernels
    layer, x, dout, cos, sin = _layer_and_inputs("gqa", torch.float64)
    real = AttentionKernels.attention

    def no_prefix(self, q, k, v, q_idx, k_idx, q_doc, k_doc, scale):
        start = int(q_idx[0])
        return real(self, q, k[:, start:], v[:, start:], q_idx, k_idx[start:], q_doc,
                    None if k_doc is None else k_doc[:, start:], scale)
    monkeypatch.setattr(AttentionKernels, "attention", no_prefix)
    x_ref = x.clone().requires_grad_()
    want = _grads(layer, x_ref, layer(x_ref, cos, sin, None), dout)
    x_got = x.clone().requires_grad_()
    got = _grads(layer, x_got, streamed_layer(layer, x_got, cos, sin, None, 8), dout)
    assert (got["x"] - want["x"]).abs().max() > 1e-2 * want["x"].abs().max()


def test_weight_gradients_leave_the_layer_once():
    """Gradient hooks (DDP, ZeRO reductions) fire once per parameter per backward, not per chunk."""
    layer, x, dout, cos, sin = _layer_and_inputs("gqa", torch.float64)
    calls = {}
    for name, p in layer.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    x = x.requires_grad_()
    streamed_layer(layer, x, cos, sin, DOCS, 7).backward(dout)
    assert calls == {name: 1 for name, _ in layer.named_parameters()}


@pytest.mark.parametrize("chunk", [64, 13])
@pytest.mark.parametrize("offload", [False, True])
def test_whole_model_with_streambp_equals_backprop(chunk, offload):
    """Every layer streamed, the chunked LM loss on top: per-parameter gradients equal ordinary
    backprop (fp64, 1e-10 relative). ``offload`` is a no-op on CPU but takes the same path."""
    from longtrain.memory import apply_streambp, unwrap_layers
    from longtrain.optim.loss import chunked_lm_loss
    torch.manual_seed(0)
    net = Transformer(get_model_args("tiny", num_layers=3)).double()
    net.init_weights()
    net.double()
    ids = torch.randint(0, net.args.vocab_size, (B, S))
    labels = torch.randint(0, net.args.vocab_size, (B, S))

    def grads():
        net.zero_grad(set_to_none=True)
        loss = chunked_lm_loss(net.hidden_states(ids, doc_ids=DOCS), net.output_weight, labels, chunk_size=16)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters()}

    want_loss, want = grads()
    apply_streambp(net, chunk, offload=offload)
    got_loss, got = grads()
    unwrap_layers(net)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    for name, g in want.items():
        assert ((got[name] - g).abs().max() / g.abs().max()).item() < 1e-10, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_inputs_on_gpu_give_the_same_gradients():
    layer, x, dout, cos, sin = _layer_and_inputs("gqa", torch.float32)
    layer, x, dout, cos, sin = layer.cuda(), x.cuda(), dout.cuda(), cos.cuda(), sin.cuda()
    results = []
    for offload in (False, True):
        x_in = x.clone().requires_grad_()
        results.append(_grads(layer, x_in, streamed_layer(layer, x_in, cos, sin, None, 8, offload=offload), dout))
    for name, g in results[0].items():
        torch.testing.assert_close(results[1][name], g, rtol=1e-5, atol=1e-6)


def test_auto_chunk_size_follows_geometry_and_free_memory():
    from longtrain.memory.streambp import auto_chunk_size, chunk_working_set_bytes
    llama1b = get_model_args("llama1b")
    per_token = chunk_working_set_bytes(llama1b, batch=1, elem_bytes=2)
    assert per_token == 2 * (6 * 2048 + 2 * 2048 + 4 * 8192) * 2  # 192 KiB a token in bf16
    chunk = auto_chunk_size(llama1b, 131072, 1, free_bytes=60 * 2**30)
    assert chunk % 256 == 0 and chunk * per_token <= 60 * 2**30 / 8 < (chunk + 256) * per_token
    assert auto_chunk_size(llama1b, 131072, 1, free_bytes=1) == 256          # never below one multiple
    assert auto_chunk_size(llama1b, 1000, 1, free_bytes=80 * 2**30) == 1000  # never above the sequence
    assert auto_chunk_size(llama1b, 131072, 1, free_bytes=None) == 4096      # CPU: the default


# ---------------------------------------------------------------- under sequence parallelism (gloo)
def _sp_worker(rank: int, world: int) -> dict:
    import functools

    import torch.distributed as dist

    from longtrain.parallel.ring import zigzag_ring_attention
    from longtrain.parallel.sharding import zigzag_shard
    from longtrain.parallel.ulysses import UlyssesAttention
    errs = {}
    # What each attention function answers StreamBP at degree 2 (1.0 marks a wrong answer).
    from longtrain.kernels.attention import ChunkKeys
    from longtrain.parallel.ring import RingAttention
    k = torch.randn(B, S // world, 2, 8, dtype=torch.float64)
    keys = UlyssesAttention(None).chunk_keys(k, k, None, 0.5, 4)
    errs["chunk_keys ulysses"] = float(not isinstance(keys, ChunkKeys) or keys.k_bshd.shape != (B, S, 1, 8)
                                       or keys.key_end(0, 7) != S // world + 7)
    errs["chunk_keys hybrid"] = float(UlyssesAttention(None, inner=RingAttention(None)).chunk_keys(
        k, k, None, 0.5, 4) is not None)
    errs["chunk_keys ring"] = float(RingAttention(None).chunk_keys(k, k, None, 0.5, 4) is not None)
    for model in ("gqa", "qwen3"):  # qwen3 here has one KV head: replicated for U=2
        for layout in ("ulysses", "ring"):
            layer, x, dout, cos, sin = _layer_and_inputs(model, torch.float64)
            x_ref = x.clone().requires_grad_()
            want = _grads(layer, x_ref, layer(x_ref, cos, sin, DOCS), dout)
            if layout == "ulysses":
                layer.self_attn.attn_fn = UlyssesAttention(None)
                shard = lambda t: t.chunk(world, dim=1)[rank].contiguous()  # noqa: E731
            else:
                layer.self_attn.attn_fn = functools.partial(zigzag_ring_attention, group=None, seq_len=S)
                shard = lambda t: zigzag_shard(t, world, rank)  # noqa: E731
            errs[f"{model} {layout} streams attention"] = float(is_streamable(layer) != (layout == "ulysses"))
            x_local = shard(x).requires_grad_()
            out = streamed_layer(layer, x_local, shard(cos), shard(sin), shard(DOCS), chunk_size=7)
            got = _grads(layer, x_local, out, shard(dout))
            for name, g in got.items():
                if name == "x":
                    err = (g - shard(want["x"])).abs().max() / want["x"].abs().max()
                else:  # every rank holds its tokens' share of the weight gradients
                    dist.all_reduce(g)
                    err = (g - want[name]).abs().max() / want[name].abs().max()
                errs[f"{model} {layout} {name}"] = err.item()
    return errs


def test_streamed_layer_under_ulysses_and_ring_equals_backprop():
    """Ulysses 2 (attention streamed after the all-to-all) and ring 2 (MLP streamed): the input
    gradients of each rank's tokens and the summed weight gradients equal one process's (fp64, 1e-10);
    Ulysses 2 answers ``chunk_keys`` with its all-to-all strategy, ring and hybrid with None."""
    from support.harness import run_ranks
    world = 2
    for rank, errs in enumerate(run_ranks(_sp_worker, world)):
        assert {name.rsplit(" ", 1)[0] for name in errs} >= {f"{m} {lay}" for m in ("gqa", "qwen3")
                                                             for lay in ("ulysses", "ring")} | {"chunk_keys"}
        for name, err in errs.items():
            assert err < 1e-10, f"rank {rank} {name}: {err:.3g}"
