"""Load balancing of Mixture-of-Experts routers: the balancing loss at a chosen scope, the router
z-loss and auxiliary-loss-free bias balancing (docs/MOE.md).

Balancing loss. For one MoE layer and one *group* of ``T`` tokens, with ``c_i`` the assignments the
router selected for expert ``i`` (each token selects ``top_k``) and ``P_ti`` the router's softmax
probabilities::

    LBL = E * sum_i f_i p_i,    f_i = c_i / T,    p_i = (1/T) sum_t P_ti

(the Switch-Transformer loss as transformers computes it for one layer; ``top_k`` at perfect
balance). The loss added to the training objective is ``coef`` times its mean over the step's
groups and over the MoE layers. ``moe.balance.scope`` says what a group is:

- ``micro_batch``: the sequences of one rank's micro-batch (whole sequences: the counts are summed
  over the sequence-parallel ranks); the step's ``dp x grad_accum`` groups are averaged, as a data
  parallel run with per-micro-batch balancing does.
- ``sequence``: each sequence alone (counts summed over sequence-parallel ranks); averaged over the
  global batch.
- ``global``: the whole step. The counts are summed over the data x sequence parallel ranks after
  each micro-batch's forward (one all-reduce of ``[layers, experts]`` counts per micro-batch) and
  kept as running totals over the step's accumulation micro-batches: micro-batch ``j`` uses
  ``f`` of the micro-batches ``1..j`` and ``p`` of micro-batch ``j`` (over all ranks), and the
  step's loss is the mean over ``j``. Without accumulation this is exactly the loss of the whole
  global batch, whatever the data and sequence parallel layout. Counts of the *whole* step would
  need every micro-batch's routing before the first backward, i.e. one more forward pass per
  micro-batch (or every micro-batch's graph held at once); running totals cost nothing more than
  the all-reduce, and the later micro-batches, which carry most of the step, balance against
  nearly the whole step's counts.

Only the counts travel: ``f`` carries no gradient, so the loss's gradient w.r.t. each token's
probabilities is the constant ``coef/L * E * f_i / T / groups``. That constant is what this module
computes; each MoE block adds it in its backward (:class:`longtrain.models.moe._AuxGrad`), so the
probabilities never have to be kept outside the block and recomputation (activation checkpointing,
StreamBP chunks) neither counts twice nor sees only a chunk.

Router z-loss: ``z_loss_coef`` times the mean over the step's tokens of ``logsumexp(logits)^2``,
averaged over MoE layers (normalised by the global token count, so it is layout independent).

Bias balancing (``bias_update_rate`` > 0, DeepSeek-V3's auxiliary-loss-free method): a per-layer,
per-expert bias is added to the probabilities for the top-k choice only; after each step it moves
by the rate towards balance using the step's global counts (identical on every rank).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from longtrain.config import MoETrainConfig
from longtrain.models.moe import MoE
from longtrain.parallel.distributed import all_reduce_sum


class Balancer:
    """Sets the MoE blocks' auxiliary-loss gradients for each micro-batch and reports the step's
    loads; call :meth:`begin_step`, then :meth:`after_forward` after every micro-batch's forward
    (before its backward), then :meth:`end_step`.

    Args:
        model: the model (its :class:`MoE` blocks are found in layer order).
        cfg: the ``moe.*`` settings.
        dims: the run's :class:`longtrain.parallel.dims.ParallelDims` (groups built).
        micro_batch_size: sequences per rank per micro-batch.
        grad_accum: micro-batches per step.
        seq_len: tokens per (whole) sequence.
        loss_scale: the step engine's ``loss_scale``, the factor its backward multiplies the root
            loss by (ZeRO's averaging divisor, 1 for the plain engine), so the injected gradients
            are scaled alike.
    """

    def __init__(self, model: nn.Module, cfg: MoETrainConfig, dims, micro_batch_size: int, grad_accum: int,
                 seq_len: int, loss_scale: float = 1.0) -> None:
        self.layer_ids = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
        self.blocks: List[MoE] = [model.layers[i].mlp for i in self.layer_ids]
        if not self.blocks:
            raise ValueError("Balancer: the model has no MoE layers")
        self.scope, self.coef = cfg.balance.scope, cfg.balance.coef
        self.z_coef, self.rate = cfg.z_loss_coef, cfg.balance.bias_update_rate
        self.dims, self.seq_len, self.grad_accum = dims, seq_len, grad_accum
        self.dp = dims.size("dp")
        self.grad_scale = loss_scale
        self.num_layers, self.num_experts = len(self.blocks), self.blocks[0].num_experts
        device = self.blocks[0].gate.weight.device
        self.bias: Optional[torch.Tensor] = None
        if self.rate > 0:
            self.bias = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float32, device=device)
            self._attach_bias()
        self.step_tokens = micro_batch_size * grad_accum * self.dp * seq_len
        z_weight = self.z_coef * loss_scale / (self.num_layers * self.step_tokens) if self.z_coef > 0 else None
        for block in self.blocks:
            block.aux_grad, block.z_weight = self.coef > 0, z_weight
        self._step_counts: Optional[torch.Tensor] = None
        self.begin_step()

    def _attach_bias(self) -> None:
        for block, bias in zip(self.blocks, self.bias):
            block.expert_bias = bias

    # ------------------------------------------------------------------ per step
    def begin_step(self) -> None:
        """Reset the step's running counts and loss sums."""
        shape, dev = (self.num_layers, self.num_experts), self.blocks[0].gate.weight.device
        self._counts = torch.zeros(shape, dtype=torch.float64, device=dev)  # local, or global (scope global)
        self._lbl = torch.zeros(self.num_layers, dtype=torch.float64, device=dev)  # this rank's share
        self._z = torch.zeros(self.num_layers, dtype=torch.float64, device=dev)
        self._micro = 0
        for block in self.blocks:
            block.aux_weights = None

    def after_forward(self) -> None:
        """After a micro-batch's forward: reduce its expert counts as the scope needs and set every
        block's ``aux_weights`` (the gradient its backward adds)."""
        routings = [block.last_routing for block in self.blocks]
        if any(r is None for r in routings):
            raise RuntimeError("Balancer.after_forward: an MoE block has no routing (call it after a forward)")
        counts_lbe = torch.stack([r.row_counts for r in routings]).double()
        probs_lbe = torch.stack([r.prob_sums for r in routings]).double()
        rows, s, e = counts_lbe.shape[1], self.seq_len, self.num_experts
        if self.scope == "micro_batch":
            c_le = all_reduce_sum(counts_lbe.sum(1), self.dims.group("sp"))
            tokens = rows * s
            base_lbe = (e * c_le / tokens / tokens / (self.dp * self.grad_accum)).unsqueeze(1)
            self._counts += counts_lbe.sum(1)
        elif self.scope == "sequence":
            c_lbe = all_reduce_sum(counts_lbe.clone(), self.dims.group("sp"))
            base_lbe = e * c_lbe / s / s / (rows * self.dp * self.grad_accum)
            self._counts += counts_lbe.sum(1)
        else:  # global: running totals over the step's micro-batches, summed over dp x sp
            self._counts += all_reduce_sum(counts_lbe.sum(1), self.dims.group("dp_sp"))
            micro_tokens = rows * self.dp * s
            seen = micro_tokens * (self._micro + 1)
            base_lbe = (e * self._counts / seen / micro_tokens / self.grad_accum).unsqueeze(1)
        self._lbl += (base_lbe * probs_lbe).sum((1, 2))
        if self.z_coef > 0:
            self._z += torch.stack([r.lse_sq_sum for r in routings]).double() / self.step_tokens
        scale = self.coef * self.grad_scale / self.num_layers
        for block, base_be in zip(self.blocks, base_lbe):
            block.aux_weights = (base_be * scale).float() if self.coef > 0 else None
        self._micro += 1

    @torch.no_grad()
    def end_step(self, expert_frac: bool = True) -> Dict[str, object]:
        """The step's balance metrics (reduced over dp x sp); the bias moves in :meth:`update_bias`.

        Returns:
            ``aux_loss`` (what the auxiliary losses added to the objective), ``moe/lbl`` and
            ``moe/z_loss`` (means over layers, without their coefficients), ``moe/maxvio`` (mean
            over layers of max load / mean load - 1 over the global batch), and per layer
            ``moe/layer{i}/{lbl,maxvio}`` and, with ``expert_frac``, ``moe/layer{i}/expert_frac``
            (each expert's share of the layer's assignments).
        """
        if self._micro != self.grad_accum:
            raise RuntimeError(f"Balancer.end_step: saw {self._micro} micro-batches, expected {self.grad_accum}")
        group = self.dims.group("dp_sp")
        sums = all_reduce_sum(torch.stack([self._lbl, self._z]), group)
        counts = self._counts if self.scope == "global" else all_reduce_sum(self._counts.clone(), group)
        lbl, z = sums[0], sums[1]
        mean_load = counts.mean(1, keepdim=True)
        maxvio = counts.max(1).values / mean_load.squeeze(1).clamp(min=1e-12) - 1
        frac = counts / counts.sum(1, keepdim=True).clamp(min=1e-12)
        self._step_counts = counts
        out: Dict[str, object] = {
            "aux_loss": float(self.coef * lbl.mean() + self.z_coef * z.mean()),
            "moe/lbl": float(lbl.mean()), "moe/maxvio": float(maxvio.mean()),
        }
        if self.z_coef > 0:
            out["moe/z_loss"] = float(z.mean())
        for j, i in enumerate(self.layer_ids):
            out[f"moe/layer{i}/lbl"] = float(lbl[j])
            out[f"moe/layer{i}/maxvio"] = float(maxvio[j])
            if expert_frac:
                out[f"moe/layer{i}/expert_frac"] = [round(float(v), 6) for v in frac[j]]
        if self.bias is not None:
            out["moe/bias_absmax"] = float(self.bias.abs().max())
        self.begin_step()
        return out

    @torch.no_grad()
    def update_bias(self) -> None:
        """Bias balancing after an applied optimizer step (not after a skipped one): every expert's
        bias moves by ``bias_update_rate`` towards balance, by the step's global counts."""
        if self.bias is not None and self._step_counts is not None:
            counts = self._step_counts
            self.bias += self.rate * torch.sign(counts.mean(1, keepdim=True) - counts).float()
        self._step_counts = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The routing bias (empty without bias balancing)."""
        return {} if self.bias is None else {"bias": self.bias.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore the routing bias saved by :meth:`state_dict` (a saved bias is used even when
        ``bias_update_rate`` is now 0: it is part of how the model routes; it then stays fixed)."""
        if "bias" not in state:
            return
        bias = state["bias"]
        if tuple(bias.shape) != (self.num_layers, self.num_experts):
            raise ValueError(f"moe balance state: bias of shape {tuple(bias.shape)} does not fit "
                             f"{self.num_layers} MoE layers x {self.num_experts} experts")
        device = self.blocks[0].gate.weight.device
        if self.bias is None:
            self.bias = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float32, device=device)
        self.bias.copy_(bias)
        self._attach_bias()
