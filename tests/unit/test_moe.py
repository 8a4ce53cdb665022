"""MoE block: HF parity (qwen3_moe, mixtral), conversion round trips, the reference expert path,
capacity dropping, router outputs, StreamBP through MoE layers, config errors, a training smoke run.

Tolerances: fp32 logits against transformers at rtol=atol=1e-5 (same ops, the experts' outputs
summed in another order, ~1e-6 relative at these sizes); the block against a per-token loop in
fp64 at 1e-12; StreamBP against ordinary backprop in fp64 at 1e-10 relative (as tests/distributed/test_streambp.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from longtrain.memory.streambp import streamed_layer
from longtrain.models import ModelArgs, Transformer, args_from_hf_config, from_hf, get_model_args, to_hf
from longtrain.models.moe import MoE, router_outputs

from support.helpers import moe_args, perturb

transformers = pytest.importorskip("transformers")

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
HF_CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=False, head_dim=16, num_hidden_layers=3,
                                         decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3_moe_norm_step2": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=32,
                                                    norm_topk_prob=True, num_hidden_layers=2, decoder_sparse_step=2,
                                                    tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2)),
}


def _ids(vocab: int = 96, batch: int = 2, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_transformers_both_ways(case, tmp_path):
    cls_name, extra = HF_CASES[case]
    config = getattr(transformers, cls_name)(vocab_size=96, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, **extra)
    config._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")  # per-expert tensors on disk
    ours = from_hf(tmp_path / "hf").eval()
    assert ours.args.arch == config.model_type
    assert ours.args.moe_layers == tuple(i for i, layer in enumerate(hf.model.layers)
                                         if hasattr(layer.mlp, "experts"))
    ids = _ids()
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(ours(ids), want, **FP32_TOL)
    to_hf(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert args_from_hf_config(back.config.to_dict()) == ours.args
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, **FP32_TOL)


def test_stacked_experts_load_too_and_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(moe_args(dense_layers=(0,)))
    perturb(ours)
    to_hf(ours, tmp_path / "a", max_shard_bytes=50_000)
    again = from_hf(tmp_path / "a")
    for (name, p), q in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    # transformers 5's in-memory layout (stacked experts) is read as well
    from safetensors.torch import save_file
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()},
              str(tmp_path / "b" / "model.safetensors"))
    stacked = from_hf(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), stacked.state_dict().values()))
    # a missing expert is named
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "b" / "model.safetensors"))
    del state["model.layers.1.mlp.experts.down_proj"]
    save_file(state, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError, match="model.hf_path: .* lacks 1 model tensors, e.g. model.layers.1.mlp.experts"):
        from_hf(tmp_path / "b")


def _naive_moe(block: MoE, x_th: torch.Tensor) -> torch.Tensor:
    """One token at a time, straight from the definition."""
    out = torch.zeros_like(x_th)
    for t in range(x_th.shape[0]):
        probs = torch.softmax(F.linear(x_th[t], block.gate.weight), -1)
        weights, experts = torch.topk(probs, block.top_k)
        if block.norm_topk_prob:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            gate, up = (block.experts.gate_up_proj[e] @ x_th[t]).chunk(2)
            out[t] += w * (block.experts.down_proj[e] @ (F.silu(gate) * up))
        if block.shared_experts is not None:
            out[t] += block.shared_experts(x_th[t])
    return out


@pytest.mark.parametrize("norm,shared", [(True, 0), (False, 2)])
def test_block_equals_per_token_loop_in_fp64(norm, shared):
    torch.manual_seed(0)
    block = MoE(moe_args(norm_topk_prob=norm, num_shared_experts=shared)).double()
    perturb(block)
    x_bsh = torch.randn(2, 24, 64, dtype=torch.float64)
    got = block(x_bsh)
    want = _naive_moe(block, x_bsh.reshape(-1, 64)).view_as(got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    routing = block.last_routing
    assert routing.experts.shape == (48, 2) and routing.row_counts.sum(1).tolist() == [48.0, 48.0]
    assert routing.counts.sum() == 48 * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_mm_equals_reference_loop_on_gpu():
    """bf16 on CUDA: one grouped product against the per-expert loop (bf16 rounding, 2e-2)."""
    from longtrain.models.moe import use_grouped_mm
    torch.manual_seed(0)
    block = MoE(moe_args(num_experts=8)).cuda().bfloat16()
    perturb(block)
    x_nh = torch.randn(200, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    counts = torch.tensor([30, 0, 50, 20, 40, 10, 0, 50], device="cuda")
    assert use_grouped_mm(x_nh)
    got = block.experts(x_nh, counts)
    want = block.experts.reference(x_nh, counts)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    g_got = torch.autograd.grad(got.float().square().sum(), [x_nh, block.experts.gate_up_proj])
    g_want = torch.autograd.grad(want.float().square().sum(), [x_nh, block.experts.gate_up_proj])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_gradients_reach_router_and_experts_and_routing_is_recorded():
    torch.manual_seed(0)
    model = Transformer(moe_args(num_shared_experts=1))
    model.init_weights()
    ids = _ids()
    logits = model(ids)
    routings = router_outputs(model)
    assert len(routings) == 2
    for r in routings:
        assert r.experts.shape == (80, 2) and r.row_counts.shape == (2, 6) and r.prob_sums.shape == (2, 6)
        assert r.row_counts.sum(1).tolist() == [80.0, 80.0]  # 40 tokens x top-2 per row
        torch.testing.assert_close(r.prob_sums.sum(1), torch.full((2,), 40.0))  # probabilities sum to 1
        assert not r.prob_sums.requires_grad
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # every expert got tokens here, so every expert's slice has a gradient
    assert (model.layers[0].mlp.experts.down_proj.grad.flatten(1).abs().sum(1) > 0).all()


def test_bf16_autocast_forward_is_close_to_fp32():
    torch.manual_seed(0)
    model = Transformer(moe_args(num_shared_experts=1))
    model.init_weights()
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)  # bf16 rounding, ~1e-2


def test_capacity_factor_drops_only_when_set():
    torch.manual_seed(0)
    args = moe_args()
    block = MoE(args)
    perturb(block)
    x_bsh = torch.randn(1, 60, 64)
    free = block(x_bsh)
    assert block.last_routing.counts.sum() == 120  # no capacity: every assignment computed
    roomy = MoE(dataclasses.replace(args, capacity_factor=float(args.num_experts)))  # capacity >= all tokens
    roomy.load_state_dict(block.state_dict())
    torch.testing.assert_close(roomy(x_bsh), free, rtol=0, atol=0)
    tight = MoE(dataclasses.replace(args, capacity_factor=0.5))
    tight.load_state_dict(block.state_dict())
    out = tight(x_bsh)
    capacity = tight.capacity(60)
    assert capacity == 10 and (tight.last_routing.counts <= capacity).all()
    assert tight.last_routing.counts.sum() < 120
    # the earliest tokens keep their experts: a token all of whose assignments fit is unchanged
    kept = torch.zeros(60 * 2, dtype=torch.bool)
    experts = tight.last_routing.experts.reshape(-1)
    for e in range(args.num_experts):
        kept[(experts == e).nonzero()[:capacity]] = True
    whole = kept.view(60, 2).all(1)
    assert whole.any() and not whole.all()
    torch.testing.assert_close(out[0, whole], free[0, whole], rtol=1e-5, atol=1e-6)  # BLAS blocking varies with threads
    assert not torch.allclose(out[0, ~whole], free[0, ~whole])


@pytest.mark.parametrize("chunk", [40, 7])
@pytest.mark.parametrize("attention", ["local", "distributed"])
def test_streamed_moe_layer_equals_backprop_fp64(chunk, attention):
    from longtrain.kernels.attention import local_attention
    torch.manual_seed(0)
    net = Transformer(moe_args(num_layers=1, num_shared_experts=1)).double()
    perturb(net)
    layer = net.layers[0]
    if attention == "distributed":  # any other attention function: attention recomputed whole, MLP half streamed
        layer.self_attn.attn_fn = lambda q, k, v, doc_ids=None, scale=None: local_attention(q, k, v, doc_ids=doc_ids,
                                                                                              scale=scale)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 64, generator=gen, dtype=torch.float64)
    dout = torch.randn(2, 40, 64, generator=gen, dtype=torch.float64)
    cos, sin = net.rope(torch.arange(40).expand(2, 40), torch.float64)
    params = list(layer.parameters())

    def grads(fn):
        x_leaf = x.clone().requires_grad_()
        out = fn(x_leaf)
        return out.detach(), torch.autograd.grad(out, [x_leaf, *params], dout)

    want_out, want = grads(lambda t: layer(t, cos, sin, None))
    want_experts = layer.mlp.last_routing.experts
    got_out, got = grads(lambda t: streamed_layer(layer, t, cos, sin, None, chunk))
    assert torch.equal(got_out, want_out) and torch.equal(layer.mlp.last_routing.experts, want_experts)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, w in zip(names, got, want):
        err = ((g - w).abs().max() / w.abs().max()).item()
        assert err < 1e-10, f"{name}: relative error {err:.3g}"


def test_streambp_refuses_capacity_factor():
    from longtrain.memory import apply_streambp
    model = Transformer(moe_args(capacity_factor=1.25))
    with pytest.raises(ValueError, match="model.moe.capacity_factor"):
        apply_streambp(model, 16, offload=False)


@pytest.mark.parametrize("overrides,key", [
    (dict(num_experts=-1), "model.moe.num_experts"),
    (dict(top_k=7), "model.moe.top_k"),
    (dict(top_k=0), "model.moe.top_k"),
    (dict(num_shared_experts=-2), "model.moe.num_shared_experts"),
    (dict(capacity_factor=0.0), "model.moe.capacity_factor"),
    (dict(dense_layers=(5,)), "model.dense_layers"),
])
def test_bad_moe_settings_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        get_model_args("tiny_moe", **{"num_experts": 6, **overrides})


def test_config_keys_reach_the_model_and_export_checks():
    from longtrain.config import ModelConfig, MoEConfig
    from longtrain.models import hf_config_from_args
    from longtrain.trainer.build import build_model_args
    args = build_model_args(ModelConfig(name="tiny", moe=MoEConfig(num_experts=4, top_k=1, num_shared_experts=1)))
    assert (args.num_experts, args.top_k, args.num_shared_experts) == (4, 1, 1)
    assert args.moe_layers == tuple(range(args.num_layers))
    assert build_model_args(ModelConfig(name="tiny_moe", moe=MoEConfig(num_experts=0))).moe_layers == ()
    with pytest.raises(ValueError, match="model.moe.num_shared_experts"):
        hf_config_from_args(dataclasses.replace(moe_args(), num_shared_experts=1))
    with pytest.raises(ValueError, match="model.moe.num_experts"):
        hf_config_from_args(moe_args(arch="qwen3"))
    with pytest.raises(ValueError, match="model.moe.num_experts: qwen3_moe export needs experts"):
        hf_config_from_args(moe_args(num_experts=0))
    # dense models are unchanged by the MoE fields
    assert not get_model_args("tiny").moe_layers


def test_registry_moe_sizes():
    big = get_model_args("qwen3_30b_a3b")  # Qwen3-30B-A3B: 30.5B total, 3.3B active
    assert abs(big.num_params() - 30.53e9) < 0.01e9 and abs(big.num_params(active=True) - 3.35e9) < 0.01e9
    mixtral = get_model_args("mixtral_8x7b")  # Mixtral-8x7B: 46.7B total, 12.9B active
    assert abs(mixtral.num_params() - 46.70e9) < 0.01e9 and abs(mixtral.num_params(active=True) - 12.88e9) < 0.01e9
    tiny = get_model_args("tiny_moe")
    model = Transformer(tiny)
    assert sum(p.numel() for p in model.parameters()) == tiny.num_params()


def test_streambp_chunk_working_set_counts_the_routed_width():
    from longtrain.memory.streambp import chunk_working_set_bytes
    mixtral = get_model_args("mixtral_8x7b")  # top-2 of 14336-wide experts
    assert chunk_working_set_bytes(mixtral, 1, 2) == 2 * (6 * 4096 + 2 * 4096 + 4 * 2 * 14336) * 2


def test_tiny_moe_trains_two_steps(tmp_path):
    from support.helpers import train_in_process
    from support.parity import assert_same_curve
    metrics = train_in_process(tmp_path, "moe", ["model.name=tiny_moe", "trainer.max_steps=2"])
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss"] == m["loss"] and m["grad_norm"] > 0 for m in metrics)
    streamed = train_in_process(tmp_path, "moe_streambp", ["model.name=tiny_moe", "trainer.max_steps=2",
                                                           "memory.streambp.enabled=true",
                                                           "memory.streambp.chunk_size=64"])
    assert_same_curve(metrics, streamed)  # fp32: the same sums in another order (support/parity.py)
