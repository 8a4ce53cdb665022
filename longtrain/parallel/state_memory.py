"""Model-state memory per rank: the ZeRO paper's formulas and a walk over the tensors actually held.

Both engines report through these (:meth:`longtrain.parallel.engine.StepEngine.memory_report`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn


@dataclass
class MemoryFigures:
    """Bytes per rank, on the device and on the host, for each kind of training state."""

    params_device: float = 0.0
    params_host: float = 0.0
    grads_device: float = 0.0
    grads_host: float = 0.0
    optimizer_device: float = 0.0
    optimizer_host: float = 0.0


def expected_memory(num_params: int, stage: int, num_shards: int, bf16: bool, offload_optimizer: bool = False,
                    offload_params: bool = False) -> MemoryFigures:
    """Model-state bytes per rank by the ZeRO paper's formulas (Rajbhandari et al. 2020, section 5).

    With Psi parameters over N_d ranks: stage 0 holds ``(P + G + K) Psi``; stage 1
    ``(P + G) Psi + K Psi / N_d``; stage 2 ``P Psi + (G + K) Psi / N_d``; stage 3
    ``(P + G + K) Psi / N_d``. ``K = 12`` (fp32 master weights, Adam m and v) whenever DeepSpeed
    runs, fp32 or bf16; the plain stage-0 path keeps no master copy (``K = 8``). ``P = 2`` in bf16,
    4 in fp32; ``G = 4``: gradients accumulate in fp32 (the paper's ``2 Psi`` assumes fp16 gradients).
    The plain path (stage 0) trains fp32 parameters under bf16 autocast, so ``P = 4`` there.
    Offloaded state moves to the host column (ZeRO-Offload keeps the fp32 gradient partitions there too).
    """
    p = 2 if (bf16 and stage >= 1) else 4
    g, k = 4, (12 if stage >= 1 else 8)
    n = max(1, num_shards)
    params = num_params * p / (n if stage == 3 else 1)
    grads = num_params * g / (n if stage >= 2 else 1)
    optim = num_params * k / (n if stage >= 1 else 1)
    out = MemoryFigures()
    out.params_host, out.params_device = (params, 0.0) if offload_params else (0.0, params)
    if offload_optimizer:  # the host steps on an fp32 gradient partition; stage 1 still holds full grads
        out.optimizer_host = optim
        out.grads_host = num_params * 4 / n
        out.grads_device = num_params * p if stage == 1 else 0.0
    else:
        out.optimizer_device, out.grads_device = optim, grads
    return out


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_tensors(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]
                  ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(parameters, optimizer tensors) this rank holds, found by walking the tensors.

    Parameters: the local storage of each module parameter (the shard ``ds_tensor`` under ZeRO-3).
    Optimizer: the master partitions the (inner) optimizer steps when they are not the module's
    parameters, plus every tensor in its state. Gradients are not walked (DeepSpeed keeps them in
    internal buffers).
    """
    params, module_ids = [], set()
    for p in model.parameters():  # parameters() yields a tied weight once
        module_ids.add(id(p))
        t = getattr(p, "ds_tensor", None)
        params.append(p if t is None else t)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is None:
        return params, []
    # Master partitions: in the param groups, or only the state's keys (ZeRO-3 empties the groups
    # between steps).
    masters = {id(p): p for group in inner.param_groups for p in group["params"]}
    masters.update({id(p): p for p in inner.state})
    tensors = [p for i, p in masters.items() if i not in module_ids]
    for state in inner.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    return params, tensors


def measured_memory(model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    device: torch.device) -> MemoryFigures:
    """Parameter and optimizer-state bytes this rank holds (:func:`state_tensors`); the trainer
    measures gradients with the CUDA allocator. A tensor counts as "device" when it sits on the
    training ``device`` (so everything does in a CPU run)."""
    out = MemoryFigures()
    params, optim = state_tensors(model, optimizer)
    for t in params:
        if t.device.type == device.type:
            out.params_device += _bytes(t)
        else:
            out.params_host += _bytes(t)
    for t in optim:
        if t.device.type == device.type:
            out.optimizer_device += _bytes(t)
        else:
            out.optimizer_host += _bytes(t)
    return out
