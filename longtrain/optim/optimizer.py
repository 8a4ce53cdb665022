"""AdamW with decoupled weight decay on matrices only, fused on CUDA when available."""
from __future__ import annotations

import logging

import torch

from longtrain.config import OptimConfig

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters.

    Weight decay applies to parameters with two or more dimensions (linear and embedding
    matrices); norms and biases are not decayed. ``optim.fused=auto`` uses torch's fused kernel on
    CUDA and the foreach implementation elsewhere.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    fused = str(cfg.fused).lower()
    use_fused = device.type == "cuda" if fused == "auto" else fused == "true"
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if use_fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)
