"""Model package: HF parity and round trips, packed documents, positions, attention, checkpointing, registry.

All on CPU. Tolerances: fp32 model logits are compared at rtol=atol=1e-5 (the two implementations
differ only in the order of floating-point reductions, ~1e-6 relative on these sizes); the
attention kernel is checked in fp64 against a dense reference at 1e-10.
"""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from longtrain.kernels.attention import document_segments, local_attention
from longtrain.models import (MODEL_REGISTRY, ModelArgs, Transformer, args_from_hf_config, from_hf, get_model_args,
                              hf_config_from_args, load_hf_weights, to_hf)

transformers = pytest.importorskip("transformers")

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0}
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _tiny(**overrides) -> ModelArgs:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=512)
    return ModelArgs(**{**base, **overrides})


def _random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    _perturb(model)
    return model


@torch.no_grad()
def _perturb(module: torch.nn.Module) -> None:
    """Make norms and biases non-trivial so a wrong mapping of them cannot pass unnoticed."""
    for name, p in module.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.copy_(0.05 * torch.randn_like(p))


def _ids(vocab: int, batch: int = 2, seq: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- HF parity
HF_CASES = {
    "llama_gqa_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_mha_untied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_rope_mqa": ("LlamaConfig", dict(num_key_value_heads=1, rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5})),
    "linear_rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters={**LINEAR_ROPE, "rope_theta": 1e4})),
    "yarn_rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters={**YARN_ROPE, "rope_theta": 1e4})),
    "qwen2_bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qknorm": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_transformers(case, tmp_path):
    cls_name, extra = HF_CASES[case]
    config = getattr(transformers, cls_name)(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=512, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    assert ours.args.arch == config.model_type
    assert (ours.args.rope_scaling is not None) == ("rope" in case)
    ids = _ids(96, seq=200)  # > original_max_position_embeddings, so every llama3 band is exercised
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **FP32_TOL)


def test_legacy_config_format_reads_like_v5():
    v5 = hf_config_from_args(_tiny(rope_theta=5e5, rope_scaling=LLAMA3_ROPE))
    legacy = {k: v for k, v in v5.items() if k != "rope_parameters"}
    assert args_from_hf_config(legacy) == args_from_hf_config(v5) == _tiny(rope_theta=5e5, rope_scaling=LLAMA3_ROPE)
    only_v5 = {k: v for k, v in v5.items() if k not in ("rope_theta", "rope_scaling")}
    assert args_from_hf_config(only_v5) == args_from_hf_config(v5)


EXPORT_CASES = {
    "llama_tied": _tiny(tie_embeddings=True),
    "llama3_rope_untied": _tiny(rope_theta=5e5, rope_scaling=LLAMA3_ROPE),
    "linear_rope": _tiny(rope_scaling=LINEAR_ROPE),
    "yarn_rope": _tiny(rope_scaling=YARN_ROPE),
    "qwen2": _tiny(arch="qwen2", qkv_bias=True, tie_embeddings=True),
    "qwen3": _tiny(arch="qwen3", qk_norm=True, head_dim=32, rms_norm_eps=1e-6),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_to_hf_loads_in_transformers(case, tmp_path):
    ours = _random_model(EXPORT_CASES[case]).eval()
    to_hf(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.model_type == ours.args.arch
    assert args_from_hf_config(hf.config.to_dict()) == ours.args
    ids = _ids(96, seq=100)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), **FP32_TOL)


def test_sharded_save_round_trips_exactly(tmp_path):
    ours = _random_model(_tiny(tie_embeddings=False))
    to_hf(ours, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    loaded = from_hf(tmp_path)
    expected, got = ours.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    to_hf(ours, tmp_path)  # a later unsharded save replaces the shards
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert list(tmp_path.glob("model-*.safetensors")) == []


def test_bf16_export_and_tied_head(tmp_path):
    ours = _random_model(_tiny(tie_embeddings=True))
    to_hf(ours, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = from_hf(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.output_weight.dtype == torch.bfloat16 and loaded.inv_freq.dtype == torch.float32
    torch.testing.assert_close(loaded.output_weight, ours.output_weight.bfloat16(), rtol=0, atol=0)


def test_hf_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no config.json in '.*missing'"):
        from_hf(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_type 'gpt2'.*llama, qwen2, qwen3"):
        args_from_hf_config({"model_type": "gpt2"})
    to_hf(_random_model(_tiny()), tmp_path)
    wider = Transformer(_tiny(intermediate_size=256))
    with pytest.raises(ValueError, match=r"tensor .model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight. has shape"):
        load_hf_weights(wider, tmp_path)
    with pytest.raises(ValueError, match="model.arch"):
        hf_config_from_args(_tiny(qkv_bias=True))


# ---------------------------------------------------------------- documents and positions
def test_packed_documents_equal_separate_runs():
    model = _random_model(_tiny()).eval()
    len_a, len_b = 17, 23
    ids = _ids(96, batch=1, seq=len_a + len_b)
    doc_ids = torch.tensor([[0] * len_a + [1] * len_b])
    position_ids = torch.cat([torch.arange(len_a), torch.arange(len_b)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, doc_ids=doc_ids)
        alone_a = model(ids[:, :len_a])
        alone_b = model(ids[:, len_a:])
        # a batch mixing a packed row and a single-document row takes the per-segment path for both
        batch = model(torch.cat([ids, ids]), torch.cat([position_ids, position_ids]),
                      torch.cat([doc_ids, torch.zeros_like(doc_ids)]))
    torch.testing.assert_close(packed, torch.cat([alone_a, alone_b], dim=1), **FP32_TOL)
    torch.testing.assert_close(batch[0], packed[0], **FP32_TOL)
    unpacked = model(ids, position_ids=position_ids)
    assert not torch.allclose(unpacked[:, len_a:], alone_b, **FP32_TOL)  # without doc_ids B sees A


def test_global_position_ids_shift_rope():
    model = _random_model(_tiny()).eval()
    ids = _ids(96, batch=2, seq=32)
    pos = torch.arange(32).expand(2, 32)
    with torch.no_grad():
        full = model(ids)
        # The first shard with its true positions is the prefix of the full forward (causality).
        torch.testing.assert_close(model(ids[:, :16], position_ids=pos[:, :16]), full[:, :16], **FP32_TOL)
        # The second shard sees no prefix when the halves are separate documents; it must then
        # match the full forward given its true (continuing) positions 16..31.
        docs = (pos >= 16).long()
        split = model(ids, position_ids=pos, doc_ids=docs)
        torch.testing.assert_close(model(ids[:, 16:], position_ids=pos[:, 16:]), split[:, 16:], **FP32_TOL)
        # RoPE is relative: a constant offset changes nothing, a wrong positions tensor does.
        torch.testing.assert_close(model(ids, position_ids=pos + 1000), full, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(ids, position_ids=pos * 2), full, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- attention kernel
def test_document_segments():
    assert document_segments(torch.tensor([0, 0, 1, 1, 1, 0, 2])) == [(0, 2), (2, 5), (5, 6), (6, 7)]
    assert document_segments(torch.tensor([4, 4, 4])) == [(0, 3)]
    assert document_segments(torch.tensor([], dtype=torch.long)) == []


def _dense_reference(q, k, v, doc_ids, scale):
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    seq = q.shape[1]
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("docs", ["none", "single", "packed"])
def test_local_attention_matches_dense_reference(num_kv_heads, docs):
    gen = torch.Generator().manual_seed(0)
    b, s, h, d = 2, 37, 4, 8
    q = torch.randn(b, s, h, d, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(b, s, num_kv_heads, d, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(b, s, num_kv_heads, d, dtype=torch.float64, generator=gen, requires_grad=True)
    doc_ids = {"none": None, "single": torch.full((b, s), 3),
               "packed": torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [5] * 1 + [6] * 36])}[docs]
    scale = 0.3
    out = local_attention(q, k, v, doc_ids=doc_ids, scale=scale)
    ref = _dense_reference(q, k, v, doc_ids, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_fn_is_swappable():
    model = _random_model(_tiny()).eval()
    calls = []

    def counting(q_bshd, k_bshd, v_bshd, doc_ids=None, scale=None):
        calls.append(q_bshd.shape)
        return local_attention(q_bshd, k_bshd, v_bshd, doc_ids=doc_ids, scale=scale)

    ids = _ids(96, seq=12)
    with torch.no_grad():
        before = model(ids)
        model.set_attention_fn(counting)
        after = model(ids)
    assert calls == [torch.Size([2, 12, 4, 16])] * 2 and torch.equal(before, after)


# ---------------------------------------------------------------- training paths
def test_activation_checkpointing_same_loss_and_grads(monkeypatch):
    from longtrain.memory import apply_checkpointing, wrappers
    ids = _ids(96, batch=2, seq=24)
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    wrapped = []
    real_checkpoint = wrappers.checkpoint
    monkeypatch.setattr(wrappers, "checkpoint", lambda fn, *a, **kw: wrapped.append(fn) or real_checkpoint(fn, *a, **kw))
    results = []
    for enabled in (False, True):
        model = _random_model(_tiny(qk_norm=True, arch="qwen3"))
        if enabled:
            apply_checkpointing(model)
        loss = F.cross_entropy(model(ids, pos, docs)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert len(wrapped) == model.args.num_layers
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7)


def test_init_is_deterministic_and_hidden_states_feed_the_head():
    a, b = _random_model(_tiny(), seed=3), _random_model(_tiny(), seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    fresh = Transformer(_tiny())
    torch.manual_seed(0)
    fresh.init_weights()
    assert torch.equal(fresh.model.layers[0].input_layernorm.weight, torch.ones(64))
    ids = _ids(96, seq=8)
    with torch.no_grad():
        torch.testing.assert_close(a.hidden_states(ids) @ a.output_weight.t(), a(ids), **FP32_TOL)
    a.to(torch.bfloat16)  # a module-wide cast must not degrade the RoPE frequencies
    assert a(ids).dtype == torch.bfloat16 and a.inv_freq.dtype == torch.float32


# ---------------------------------------------------------------- args and registry
def test_registry_entries_and_param_counts():
    for name, entry in MODEL_REGISTRY.items():
        assert ModelArgs(**dataclasses.asdict(entry)) == entry, name
        assert entry.num_params() > entry.num_params(exclude_embedding=True) > 0
    assert abs(MODEL_REGISTRY["llama1b"].num_params() - 1.236e9) < 1e6  # Llama-3.2-1B: 1,235,814,400
    assert abs(MODEL_REGISTRY["llama8b"].num_params() - 8.030e9) < 1e6  # Llama-3.1-8B: 8,030,261,248
    assert abs(MODEL_REGISTRY["llama70b"].num_params() - 70.554e9) < 1e6  # Llama-3.1-70B: 70,553,706,496
    for args in (MODEL_REGISTRY["tiny"], MODEL_REGISTRY["tiny_qwen3"], _tiny(arch="qwen2", qkv_bias=True)):
        model = Transformer(args)
        assert args.num_params() == sum(p.numel() for p in model.parameters())
    tiny = MODEL_REGISTRY["tiny"]
    expected = 6 * (tiny.num_params(exclude_embedding=True) + 384 * 128) + 6 * 4 * 4 * 32 * 1024
    assert tiny.flops_per_token(1024) == expected


def test_get_model_args_overrides_and_errors():
    with pytest.raises(ValueError, match=r"model.name: unknown model 'nope'; choose one of: tiny, tiny_qwen3, llama1b"):
        get_model_args("nope")
    args = get_model_args("tiny", hidden_size=256, num_layers=None)
    assert (args.hidden_size, args.head_dim, args.num_layers) == (256, 64, 4)
    assert get_model_args("qwen3_0_6b", hidden_size=2048).head_dim == 128  # explicit head_dim is kept
    assert MODEL_REGISTRY["tiny"].hidden_size == 128  # the registry is not mutated
    with pytest.raises(ValueError, match="model.num_routers: not a model setting"):
        get_model_args("tiny", num_routers=4)
    with pytest.raises(ValueError, match="model.num_kv_heads"):
        get_model_args("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="model.rope_scaling: rope_type 'dynamic' is not supported"):
        _tiny(rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    with pytest.raises(ValueError, match="model.rope_scaling: linear scaling needs factor"):
        _tiny(rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="model.rope_scaling: low_freq_factor is not a key of yarn scaling"):
        _tiny(rope_scaling={**YARN_ROPE, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match="model.rope_scaling: factor must be >= 1"):
        _tiny(rope_scaling={"rope_type": "linear", "factor": 0.5})
    # rope_type default is plain RoPE whatever else the mapping holds (a recipe's scaling turned off by override)
    assert _tiny(rope_scaling={**YARN_ROPE, "rope_type": "default"}).rope_scaling is None
    # yarn without original_max_position_embeddings takes max_position_embeddings, as transformers does
    assert _tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0}).rope_scaling["original_max_position_embeddings"] == 512
    with pytest.raises(ValueError, match="model.arch"):
        _tiny(arch="gpt2")


@pytest.mark.parametrize("fp32_residual", [False, True])
def test_residual_stream_dtype_under_autocast(fp32_residual):
    """Under bf16 autocast each layer's input is bf16 (the default) or fp32 (trainer.fp32_residual);
    the logits of both stay close (bf16 rounding)."""
    torch.manual_seed(0)
    model = Transformer(get_model_args("tiny", num_layers=2))
    model.init_weights()
    model.fp32_residual = fp32_residual
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for layer in model.layers]
    ids = torch.randint(0, model.args.vocab_size, (1, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_states(ids)
    for h in hooks:
        h.remove()
    assert seen == [torch.float32 if fp32_residual else torch.bfloat16] * 2
    torch.testing.assert_close(hidden.float(), model.hidden_states(ids), rtol=0.1, atol=0.1)


def test_qk_norm_hands_attention_half_precision_under_autocast():
    """Under bf16 autocast the q/k norms run in fp32; the attention function gets q and k in v's dtype
    (flash and cuDNN take half precision only: fp32 queries would fall back to SDPA per document and
    to the reference block kernels; found by bench/cuda_trace.py). In fp32 nothing changes."""
    torch.manual_seed(0)
    model = Transformer(get_model_args("tiny", num_layers=1, qk_norm=True))
    model.init_weights()
    seen = []

    def recording(q, k, v, doc_ids=None, scale=None):
        seen.append((q.dtype, k.dtype, v.dtype))
        return local_attention(q, k, v, doc_ids=doc_ids, scale=scale)
    model.set_attention_fn(recording)
    ids = torch.randint(0, model.args.vocab_size, (1, 32))
    # CUDA's autocast runs RMSNorm in fp32 (CPU's does not): the pre-hooks do what it does
    hooks = [m.register_forward_pre_hook(lambda mod, args: (args[0].float(),)) for m in model.modules()
             if isinstance(m, torch.nn.RMSNorm)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden_states(ids)
    for h in hooks:
        h.remove()
    model.hidden_states(ids)
    assert seen == [(torch.bfloat16,) * 3, (torch.float32,) * 3]


def test_streambp_chunks_get_half_precision_queries_and_keys_under_autocast():
    """StreamBP recomputes the attention half chunk by chunk with its own q/k norms: its chunks reach
    the attention kernels in v's dtype too (under CUDA's fp32 norms, emulated)."""
    from longtrain.kernels.attention import LocalAttention
    from longtrain.kernels.dispatch import AttentionKernels
    from longtrain.memory import apply_streambp

    seen = []

    class Recording(AttentionKernels):
        def attention(self, q, k, v, *args):
            seen.append((q.dtype, k.dtype, v.dtype))
            return super().attention(q, k, v, *args)

    torch.manual_seed(0)
    model = Transformer(get_model_args("tiny", num_layers=1, qk_norm=True))
    model.init_weights()
    model.set_attention_fn(LocalAttention(Recording()))
    apply_streambp(model, 16, offload=False)
    for m in model.modules():  # StreamBP calls the norms' forward without hooks: replace the forward itself
        if isinstance(m, torch.nn.RMSNorm):
            m.forward = lambda x, m=m: torch.nn.RMSNorm.forward(m, x.float())
    ids = torch.randint(0, model.args.vocab_size, (1, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden_states(ids).float().sum().backward()
    assert len(seen) == 3 and set(seen) == {(torch.bfloat16,) * 3}  # one call per chunk of 16
