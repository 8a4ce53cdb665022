"""What the trainer builds before the first step, from typed sub-configs: the model geometry, the
batch arithmetic, the precision and the initialised model."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from longtrain.config import ConfigError, ModelConfig
from longtrain.models import ModelArgs, Transformer, args_from_hf_config, get_model_args, load_hf_weights
from longtrain.models.hf import read_hf_config

_MODEL_OVERRIDES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "rope_theta", "rope_scaling", "max_position_embeddings", "tie_embeddings", "init_std")


def build_model_args(cfg: ModelConfig) -> ModelArgs:
    """Model geometry: the registry entry ``model.name`` with the geometry keys given in the config
    applied on top, or exactly the geometry of ``model.hf_path``'s config.json."""
    # An empty model.rope_scaling (the default) keeps the registry's scaling, like a null geometry key.
    overrides = {k: getattr(cfg, k) for k in _MODEL_OVERRIDES if getattr(cfg, k) not in (None, {})}
    moe = cfg.moe.model_args()  # ModelArgs field names equal the model.moe keys
    overrides.update(moe)
    if cfg.hf_path is None:
        return get_model_args(cfg.name, **overrides)
    if overrides:
        key = next(iter(overrides))
        raise ConfigError(f"model.{'moe.' * (key in moe)}{key}: the geometry comes from model.hf_path's config.json "
                          "and cannot be overridden (the weights would not fit); remove the override")
    return args_from_hf_config(read_hf_config(cfg.hf_path))


def resolve_batch_layout(global_batch_size: Optional[int], micro_batch_size: int, grad_accum: Optional[int],
                         dp_size: int) -> Tuple[int, int]:
    """(global batch size, accumulation steps) from the config, checked against each other.

    Raises:
        ConfigError: the three do not multiply out, naming the keys and a consistent value.
    """
    per_pass = micro_batch_size * dp_size
    if global_batch_size is None:
        return per_pass * (grad_accum or 1), grad_accum or 1
    if grad_accum is None:
        if global_batch_size % per_pass:
            raise ConfigError(f"data.global_batch_size={global_batch_size} is not a multiple of data.micro_batch_size "
                              f"({micro_batch_size}) x data-parallel degree ({dp_size}) = {per_pass}; set "
                              f"data.global_batch_size={max(1, global_batch_size // per_pass) * per_pass}")
        return global_batch_size, global_batch_size // per_pass
    if global_batch_size != per_pass * grad_accum:
        fix = f"set data.global_batch_size={per_pass * grad_accum}"
        if global_batch_size % per_pass == 0:
            fix += f" or trainer.grad_accum={global_batch_size // per_pass} (or null)"
        raise ConfigError(f"data.global_batch_size={global_batch_size} must equal data.micro_batch_size "
                          f"({micro_batch_size}) x trainer.grad_accum ({grad_accum}) x data-parallel degree "
                          f"({dp_size}) = {per_pass * grad_accum}; {fix}")
    return global_batch_size, grad_accum


def resolve_precision(precision: str, device: torch.device) -> str:
    """``trainer.precision`` with ``auto`` resolved: bf16 on CUDA, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def build_model(args: ModelArgs, hf_path: Optional[str], seed: int, device: torch.device,
                init_from: Optional[str] = None) -> Transformer:
    """The Transformer of ``args`` on ``device``: random weights drawn from ``seed`` (the same on
    every rank), then ``hf_path``'s weights, or those of the longtrain checkpoint ``init_from``, when given.

    The weights are made on ``device`` itself (drawn by its generator), so a GPU run neither builds the
    model in host memory first nor waits for a CPU initialisation of billions of weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
        model.init_weights()
    if hf_path is not None:
        load_hf_weights(model, hf_path)
    if init_from is not None:
        from longtrain.trainer.init_from import check_geometry, find_checkpoint, load_weights

        checkpoint = find_checkpoint(init_from, "model.init_from")
        check_geometry(checkpoint, args, "model.init_from")
        load_weights(model, checkpoint)
    return model.to(device)
