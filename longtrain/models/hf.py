"""Hugging Face conversion: local ``config.json`` + safetensors <-> :class:`Transformer`.

Parameter names are identical on both sides, so weights are copied without renaming or
permutation. Supported model types: llama, qwen2 (q/k/v bias), qwen3 (q/k norm).

RoPE in ``config.json``: transformers >= 5 writes ``rope_parameters`` (with ``rope_theta``
inside); earlier versions write top-level ``rope_theta`` and ``rope_scaling``. On reading,
``rope_scaling`` takes precedence over ``rope_parameters`` (as in transformers 5); on writing, both
forms are emitted with the same content so either generation of transformers reads the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longtrain.models.args import ModelArgs
from longtrain.models.llama import Transformer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PathLike = Union[str, Path]


def _unsupported(what: str) -> ValueError:
    return ValueError(f"model.hf_path: {what} is not supported by longtrain's Transformer")


def _rope_from_hf(cfg: Dict[str, Any]):
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise _unsupported(f"rope_type {rope_type!r} (supported: default, llama3)")
    scaling = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
    scaling["original_max_position_embeddings"] = params.get("original_max_position_embeddings",
                                                             cfg.get("max_position_embeddings"))
    return theta, {"rope_type": "llama3", **scaling}


def args_from_hf_config(cfg: Dict[str, Any]) -> ModelArgs:
    """:class:`ModelArgs` from the dict of an HF ``config.json`` (transformers 4 or 5 format).

    Raises:
        ValueError: unsupported model_type or feature (sliding window, MLP/output biases, non-SiLU
            activation, RoPE other than default/llama3), or a missing required key.
    """
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model.hf_path: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(ARCHITECTURES)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"model.hf_path: config.json lacks {', '.join(missing)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act {cfg['hidden_act']!r}")
    if cfg.get("mlp_bias"):
        raise _unsupported("mlp_bias")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise _unsupported(f"attention_bias for {model_type} (it also puts a bias on o_proj)")
    if cfg.get("use_sliding_window"):
        raise _unsupported("use_sliding_window")
    theta, scaling = _rope_from_hf(cfg)
    return ModelArgs(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        init_std=cfg.get("initializer_range", 0.02), arch=model_type)


def hf_config_from_args(args: ModelArgs, dtype: Optional[torch.dtype] = None, bos_token_id: Optional[int] = None,
                        eos_token_id: Optional[int] = None) -> Dict[str, Any]:
    """The ``config.json`` dict of ``args`` for ``model_type = args.arch``.

    Args:
        args: the model geometry.
        dtype: dtype of the saved weights (written as ``dtype`` and ``torch_dtype``); None: float32.
        bos_token_id: tokenizer BOS id, or None.
        eos_token_id: tokenizer EOS id, or None.

    Raises:
        ValueError: ``args`` uses a feature the HF class of ``args.arch`` lacks (llama: no qkv
            bias or qk norm; qwen2: qkv bias and no qk norm; qwen3: qk norm and no qkv bias).
    """
    wants = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True)}[args.arch]
    if (args.qkv_bias, args.qk_norm) != wants:
        raise ValueError(f"model.arch: {args.arch} export needs qkv_bias={wants[0]} and qk_norm={wants[1]}, got "
                         f"qkv_bias={args.qkv_bias}, qk_norm={args.qk_norm}; pick the arch that matches")
    dtype_name = str(dtype or torch.float32).removeprefix("torch.")
    rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        rope_parameters.update(args.rope_scaling)
    cfg = {
        "architectures": [ARCHITECTURES[args.arch]], "model_type": args.arch,
        "vocab_size": args.vocab_size, "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings, "rms_norm_eps": args.rms_norm_eps,
        "initializer_range": args.init_std, "tie_word_embeddings": args.tie_embeddings,
        "attention_dropout": 0.0, "use_cache": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "rope_parameters": rope_parameters,  # transformers >= 5
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling and dict(args.rope_scaling),  # < 5
        "dtype": dtype_name, "torch_dtype": dtype_name,
    }
    if args.arch in ("llama", "qwen3"):
        cfg["attention_bias"] = False
    if args.arch == "llama":
        cfg["mlp_bias"] = False
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.num_layers)
    return cfg


def _read_config(path: PathLike) -> Dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model.hf_path: no config.json in '{path}' (expected a local Hugging Face model directory)")
    return json.loads(config_file.read_text())


def _weight_files(path: PathLike) -> List[Path]:
    root = Path(path)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    raise ValueError(f"model.hf_path: neither {SINGLE_FILE} nor {INDEX_FILE} in '{path}'")


@torch.no_grad()
def load_hf_weights(model: Transformer, path: PathLike) -> None:
    """Copy the safetensors weights of the HF directory ``path`` into ``model`` (cast to its dtype).

    A tied model ignores a stored ``lm_head.weight``; old checkpoints' ``rotary_emb.inv_freq``
    entries are ignored.

    Raises:
        ValueError: no weight files, a tensor with no counterpart, a shape mismatch (naming the
            tensor), or model parameters the checkpoint lacks.
    """
    targets = model.state_dict()  # detached views sharing storage with the parameters
    tied = model.args.tie_embeddings
    expected = set(targets) - ({"lm_head.weight"} if tied else set())
    loaded = set()
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue
                if name not in targets:
                    raise ValueError(f"model.hf_path: tensor {name!r} in {file} has no counterpart in the model "
                                     f"(is the config's architecture right?)")
                tensor = reader.get_tensor(name)
                if tuple(tensor.shape) != tuple(targets[name].shape):
                    raise ValueError(f"model.hf_path: tensor {name!r} has shape {tuple(tensor.shape)} in {file}, the "
                                     f"model expects {tuple(targets[name].shape)}; check the model geometry")
                targets[name].copy_(tensor)
                loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"model.hf_path: '{path}' lacks {len(missing)} model tensors, e.g. {', '.join(missing[:3])}")


def from_hf(path: PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build a :class:`Transformer` from a local HF directory (config.json + safetensors, single or
    sharded with ``model.safetensors.index.json``), on CPU in ``dtype``.

    Raises:
        ValueError: missing directory/config/weights, unsupported model_type, or mismatched tensors.
    """
    args = args_from_hf_config(_read_config(path))
    with torch.device("meta"):  # no random init: every parameter is overwritten below
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    model.tie_weights()
    model.reset_rope()
    load_hf_weights(model, path)
    return model


def to_hf(model: Transformer, path: PathLike, dtype: Optional[torch.dtype] = None,
          max_shard_bytes: Optional[int] = None, bos_token_id: Optional[int] = None,
          eos_token_id: Optional[int] = None) -> None:
    """Write ``model`` as an HF directory that ``AutoModelForCausalLM.from_pretrained(path)`` loads.

    Args:
        model: the model to export (its ``args.arch`` gives the HF model_type).
        path: output directory (created; previous weight files of this layout are replaced).
        dtype: dtype of the written weights; None keeps the parameters' dtype.
        max_shard_bytes: split the weights into shards of at most this size (a tensor larger than
            it gets a shard of its own) plus ``model.safetensors.index.json``; None writes one file.
        bos_token_id: written to config.json.
        eos_token_id: written to config.json.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if model.args.tie_embeddings and name == "lm_head.weight":
            continue  # safetensors refuses shared storage; HF re-ties from tie_word_embeddings
        state[name] = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
    for stale in [root / SINGLE_FILE, root / INDEX_FILE, *root.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    saved_dtype = next(iter(state.values())).dtype
    cfg = hf_config_from_args(model.args, dtype=saved_dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(state, str(root / SINGLE_FILE), metadata=metadata)
        return
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive or None, got {max_shard_bytes}")
    shards: List[List[str]] = [[]]
    shard_bytes = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    weight_map = {}
    for i, names in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(root / file_name), metadata=metadata)
        weight_map.update({n: file_name for n in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
