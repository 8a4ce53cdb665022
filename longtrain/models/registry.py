"""Named model geometries (``model.name``): tiny CPU models for tests and real Llama-3 / Qwen3 /
Qwen3-MoE / Mixtral sizes.

The real entries copy the geometry of the published checkpoints, so that ``model.hf_path`` weights
of the same name load into them; weights are never downloaded by this project.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

from longtrain.models.args import ModelArgs

_LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _qwen3(hidden: int, inter: int, layers: int, heads: int, tied: bool) -> ModelArgs:
    return ModelArgs(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, tie_embeddings=tied, qk_norm=True, arch="qwen3")


_TINY = ModelArgs(vocab_size=384, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                  rope_theta=10000.0, max_position_embeddings=8192, tie_embeddings=True)

MODEL_REGISTRY: Dict[str, ModelArgs] = {
    "tiny": _TINY,
    "tiny_qwen3": dataclasses.replace(_TINY, arch="qwen3", qk_norm=True, rms_norm_eps=1e-6),
    # Llama-3.2-1B
    "llama1b": ModelArgs(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, rope_theta=500000.0, rope_scaling={**_LLAMA3_SCALING, "factor": 32.0},
                         max_position_embeddings=131072, tie_embeddings=True),
    # Llama-3.1-8B
    "llama8b": ModelArgs(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, rope_theta=500000.0, rope_scaling={**_LLAMA3_SCALING, "factor": 8.0},
                         max_position_embeddings=131072, tie_embeddings=False),
    # Llama-3.1-70B (trains sharded: ZeRO-3 over every GPU of the job)
    "llama70b": ModelArgs(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                          num_kv_heads=8, rope_theta=500000.0, rope_scaling={**_LLAMA3_SCALING, "factor": 8.0},
                          max_position_embeddings=131072, tie_embeddings=False),
    "qwen3_0_6b": _qwen3(1024, 3072, 28, 16, tied=True),
    "qwen3_1_7b": _qwen3(2048, 6144, 28, 16, tied=True),
    "qwen3_4b": _qwen3(2560, 9728, 36, 32, tied=True),
    "qwen3_8b": _qwen3(4096, 12288, 36, 32, tied=False),
    # Qwen3-MoE geometry at CPU size: 8 experts, top-2, renormalised weights.
    "tiny_moe": dataclasses.replace(_TINY, arch="qwen3_moe", qk_norm=True, rms_norm_eps=1e-6, num_experts=8, top_k=2,
                                    moe_intermediate_size=96, norm_topk_prob=True),
    # Qwen3-30B-A3B: 128 experts, top-8, every layer MoE
    "qwen3_30b_a3b": dataclasses.replace(_qwen3(2048, 6144, 48, 32, tied=False), arch="qwen3_moe", num_kv_heads=4,
                                         num_experts=128, top_k=8, moe_intermediate_size=768, norm_topk_prob=True),
    # Mixtral-8x7B-v0.1: 8 experts, top-2
    "mixtral_8x7b": ModelArgs(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                              num_kv_heads=8, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5,
                              tie_embeddings=False, arch="mixtral", num_experts=8, top_k=2, norm_topk_prob=True),
    # the tiny recipe's model: two layers learn passkey retrieval fastest on a CPU (README)
    "tiny_2l": dataclasses.replace(_TINY, num_layers=2),
}

_DERIVED_BY_DEFAULT = ("hidden_size", "num_heads")


def get_model_args(name: str, **overrides: Any) -> ModelArgs:
    """The registry entry ``name`` with ``overrides`` applied (a fresh object, validated again).

    Overrides whose value is None are ignored (an unset config key). When ``hidden_size`` or
    ``num_heads`` is overridden and the entry's ``head_dim`` follows the default rule
    (hidden_size // num_heads), ``head_dim`` is derived again unless it is overridden too.

    Args:
        name: a key of :data:`MODEL_REGISTRY`.
        **overrides: :class:`ModelArgs` fields to replace.

    Returns:
        The resulting :class:`ModelArgs`.

    Raises:
        ValueError: unknown ``name`` or override key, or an invalid resulting geometry.
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"model.name: unknown model {name!r}; choose one of: {', '.join(MODEL_REGISTRY)}")
    base = MODEL_REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"model.{unknown[0]}: not a model setting (unknown override{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}); valid keys: {', '.join(sorted(fields))}")
    default_head_dim = base.head_dim == base.hidden_size // base.num_heads
    if default_head_dim and "head_dim" not in overrides and any(k in overrides for k in _DERIVED_BY_DEFAULT):
        overrides["head_dim"] = None
    return dataclasses.replace(base, **overrides)
