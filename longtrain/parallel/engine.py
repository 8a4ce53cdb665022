"""The step engine: what the training loop talks to, for one micro-batch and one optimizer step.

Two implementations share one interface, :class:`StepEngine`: :class:`PlainEngine` (torch:
autocast, summed gradients over dp x sp, clipping, the optimizer) and
:class:`~longtrain.parallel.zero.ZeroEngine` (DeepSpeed ZeRO 1-3 over dp x sp). The loop calls only
these methods, never asks which engine it holds:

- per micro-batch: ``forward(batch, head, last=...)`` then ``backward(loss)``;
- per step: ``step(loss) -> StepResult(grad_norm, applied)``;
- checkpoints: ``save(dir, is_writer)`` and ``load(dir, mode)`` (``mode`` from the trainer's resume
  plan: ``same``, ``universal``, ``plain_to_zero``, ``zero_to_plain``);
- ``full_state_dict()`` and ``full_grads()`` (collective; unsharded fp32), ``memory_report()``;
- ``loss_scale``: the factor the engine's backward multiplies the loss by, which anything that
  injects gradients of its own (the MoE balancer) must apply too.

Gradient contract: each micro-batch's loss is already its token-loss sum over the global count of
valid tokens (DESIGN.md), so after ``step`` every rank has applied the plain SUM of the gradients
over every dp x sp rank and micro-batch, never an average.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from longtrain.parallel.distributed import all_reduce_gradients

log = logging.getLogger(__name__)

Head = Callable[[torch.Tensor, torch.Tensor], Any]
"""``head(final hidden states [B, S, hidden], LM head weight [vocab, hidden])``: the chunked loss in
training, passkey logits in evaluation."""

RESUME_MODES = {
    "same": "exact state",
    "universal": "fp32 weights, Adam moments and step counts re-sharded through DeepSpeed's universal checkpoint",
    "plain_to_zero": "fp32 weights, schedule and step kept; Adam moments restart from zero",
    "zero_to_plain": "fp32 weights, schedule and step kept; Adam moments restart from zero",
}
"""How a checkpoint is loaded (the resume plan's mode) and what carries over."""


@dataclass
class StepResult:
    """The outcome of one optimizer step."""

    grad_norm: float
    """Global gradient norm before clipping (non-finite when the step was not applied)."""
    applied: bool
    """Whether the weights (and optimizer state) changed."""


class StepEngine:
    """Interface of a step engine (module docstring); subclasses implement every method."""

    model: nn.Module
    """The (parallelized) Transformer."""
    optimizer: torch.optim.Optimizer
    """The torch optimizer the scheduler drives."""
    loss_scale: float = 1.0
    """Factor the engine's backward multiplies the root loss by (1 unless a framework divides)."""
    zero_stage: int = 0
    """ZeRO stage (0: no sharding): recorded in checkpoints to choose the resume mode."""

    def train(self, mode: bool = True) -> None:
        raise NotImplementedError

    def forward(self, batch: Dict[str, torch.Tensor], head: Head, last: bool = True):
        """``head(hidden, lm_head_weight)`` of ``batch`` (``input_ids``, ``position_ids``, ``doc_ids``).

        Args:
            last: this is the last micro-batch of the step (the gradient accumulation boundary).
        """
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (of the latest :meth:`forward`); after the last
        micro-batch's backward the gradients are summed over dp x sp."""
        raise NotImplementedError

    def step(self, loss: float) -> StepResult:
        """Reduce, clip and apply the accumulated gradients, then clear them; a step whose ``loss``
        or gradient norm is not finite is not applied."""
        raise NotImplementedError

    def save(self, ckpt_dir: Path, is_writer: bool) -> None:
        """Write the weights and optimizer state into ``ckpt_dir``; every rank calls it."""
        raise NotImplementedError

    def load(self, ckpt_dir: Path, mode: str, work_dir: Optional[Path] = None) -> None:
        """Load what :meth:`save` (of this or the other engine) wrote; ``mode`` in :data:`RESUME_MODES`;
        ``work_dir``: where a conversion (``universal``) may write its temporary copy (default: beside
        ``ckpt_dir``). Collective."""
        raise NotImplementedError

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Unsharded fp32 weights named as the model's ``state_dict()`` (CPU); collective."""
        raise NotImplementedError

    def full_grads(self) -> Dict[str, torch.Tensor]:
        """Unsharded accumulated gradients by parameter name, as they stand before :meth:`step`
        (summed over dp x sp once the last micro-batch's backward ran); collective. For tests and
        debugging."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Drop the accumulated gradients."""
        raise NotImplementedError

    def prime_optimizer(self) -> bool:
        """Create the optimizer state a steady-state step holds (AdamW makes it lazily in its first
        step) without taking a step; False when the engine cannot, and one training step must run
        first instead. For planning a steady-state step."""
        return False

    def buffer_tensors(self) -> List[torch.Tensor]:
        """The engine's own working buffers alive now (communication buckets): neither parameters,
        gradients nor optimizer state. For memory reports."""
        return []

    def memory_report(self, grads_device: Optional[int]) -> Optional[dict]:
        """Expected and measured model-state bytes of this rank (None where there is nothing to
        compare against a formula)."""
        return None

    def config_files(self) -> Dict[str, str]:
        """Files (name -> text) describing the engine, for the run directory."""
        return {}


def unsharded_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` as fp32 CPU copies, every alias of a tied weight included."""
    return {k: v.detach().to("cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
            for k, v in model.state_dict(keep_vars=False).items()}


class PlainEngine(StepEngine):
    """Plain torch: the model's own parameters, gradients summed over ``reduce_group`` after the
    last micro-batch's backward.

    Args:
        model: the Transformer, sequence parallelism and layer wrappers applied.
        optimizer: its optimizer.
        reduce_group: the dp x sp group (None: the whole world or a single process).
        clip_grad_norm: global gradient-norm clip (0 disables).
        autocast_dtype: torch.autocast dtype for the forward (bf16 on GPU), None for none.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, reduce_group, clip_grad_norm: float,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        self.model, self.optimizer, self.reduce_group = model, optimizer, reduce_group
        self.clip = clip_grad_norm if clip_grad_norm > 0 else math.inf
        self.autocast_dtype = autocast_dtype
        self._last = True

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.model.output_weight.device.type, dtype=self.autocast_dtype)

    def forward(self, batch, head, last=True):
        self._last = last
        with self._autocast():  # the head too: its matmuls in the autocast dtype (the loss accumulates in fp32)
            hidden = self.model.hidden_states(batch["input_ids"], position_ids=batch["position_ids"],
                                              doc_ids=batch["doc_ids"])
            return head(hidden, self.model.output_weight)

    def backward(self, loss):
        loss.backward()
        if self._last:  # the accumulation boundary: sum over dp x sp once per step, as ZeRO-1 does
            all_reduce_gradients(self.model.parameters(), self.reduce_group)

    def step(self, loss):
        # Loss and gradients are summed over every rank by now, so every rank takes the same
        # decision. A non-finite norm makes the clip write NaNs into the gradients: dropped below.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.zero_grad()
        return StepResult(grad_norm, applied)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def prime_optimizer(self):
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.zero_grad()
        return True

    def save(self, ckpt_dir, is_writer):
        # Looked up at the call, so a test can make longtrain.io's writers fail (a full disk).
        from longtrain.io import save_model, save_torch

        if is_writer:
            save_model(self.model, Path(ckpt_dir) / "model.safetensors")
            save_torch(self.optimizer.state_dict(), Path(ckpt_dir) / "optimizer.pt")

    def load(self, ckpt_dir, mode, work_dir=None):
        from longtrain.io import load_model, load_torch

        if mode == "same":
            load_model(self.model, Path(ckpt_dir) / "model.safetensors")
            self.optimizer.load_state_dict(load_torch(Path(ckpt_dir) / "optimizer.pt"))
        elif mode == "zero_to_plain":
            from longtrain.parallel.zero_checkpoint import consolidated_fp32

            self.model.load_state_dict(consolidated_fp32(ckpt_dir), strict=False)
        else:
            raise ValueError(f"checkpoint.resume: the plain engine cannot load a checkpoint in mode '{mode}'")

    def full_state_dict(self):
        return unsharded_state(self.model)

    def full_grads(self):
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def describe_memory(report: dict) -> str:
    """One line: measured against expected model-state bytes per rank (:meth:`StepEngine.memory_report`)."""
    gib = 2.0**20 if report["expected"]["params_device"] < 2**30 else 2.0**30
    unit = "MiB" if gib == 2.0**20 else "GiB"
    e, m = report["expected"], report["measured"]

    def fmt(x):
        return "n/a" if x is None else f"{x / gib:.3f}"

    def pair(key):
        text = f"{key} {fmt(m[f'{key}_device'])} (expected {fmt(e[f'{key}_device'])}) {unit}"
        if m[f"{key}_host"] or e[f"{key}_host"]:
            text += f" + host {fmt(m[f'{key}_host'])} (expected {fmt(e[f'{key}_host'])})"
        return text

    return (f"memory per rank, zero stage {report['stage']} over {report['shards']} ranks "
            f"(measured vs ZeRO formula): " + "; ".join(pair(k) for k in ("params", "grads", "optimizer")))


__all__ = ["Head", "PlainEngine", "RESUME_MODES", "StepEngine", "StepResult", "describe_memory", "unsharded_state"]
