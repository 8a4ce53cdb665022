"""AdamW with decoupled weight decay on matrices only, fused on CUDA when available (DeepSpeed's
CPU AdamW when ZeRO offloads the optimizer to the host)."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from longtrain.config import OptimConfig

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device,
                    offload: bool = False, host_optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None
                    ) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters.

    Weight decay applies to parameters with two or more dimensions (linear and embedding
    matrices); norms and biases are not decayed. ``optim.fused=auto`` uses torch's fused kernel on
    CUDA and the foreach implementation elsewhere. ``offload=True`` (ZeRO with the optimizer in
    host memory) returns DeepSpeed's ``DeepSpeedCPUAdam`` in AdamW mode with the same groups and
    hyper-parameters: the engine steps it on the host partitions. ``host_optimizer(groups, **kwargs)``
    replaces it (the planner's stand-in, which keeps the same state without a C++ kernel).
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
    if offload:
        if host_optimizer is None:
            from longtrain.parallel.zero import cpu_adam as host_optimizer
        return host_optimizer([g for g in groups if g["params"]], **kwargs)
    if use_fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)
