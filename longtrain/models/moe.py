"""Mixture-of-experts MLP block (Qwen3-MoE, Mixtral) for the decoder.

Per token: a linear router gives one logit per expert, a softmax in fp32 turns them into
probabilities, the ``top_k`` largest pick the experts, and (``norm_topk_prob``) their weights are
renormalised to sum to 1. The token's output is the weighted sum of its experts' SwiGLU outputs,
plus the unweighted output of the shared experts when there are any.

The routed experts' weights are stacked (``experts.gate_up_proj`` [E, 2I, H] with the gate rows
first, ``experts.down_proj`` [E, H, I]; the layout of transformers 5), so the experts run as one
grouped matrix product over the (token, expert) assignments sorted by expert: ``torch._grouped_mm``
on CUDA in bf16, and on CPU (or where it is missing) a reference loop over each expert's contiguous
segment of the sorted assignments. No assignment is dropped unless ``capacity_factor`` is set.

Router outputs for load balancing (:mod:`longtrain.optim.balance`). After each forward the block
keeps ``last_routing``, a :class:`Routing` with the selected experts [T, k], the assignments per
expert (kept after capacity [E]; selected, per row [B, E]) and the per-row sums of the router
probabilities [B, E], all detached (T = batch * seq tokens of this rank). The auxiliary losses
never hold the probabilities outside the block: their gradient is linear in the probability sums
once the expert counts are known, so the balancer sets :attr:`MoE.aux_weights` (the gradient of
the total loss w.r.t. each row's probability sums) between a micro-batch's forward and its backward,
and the block adds ``aux_weights`` (and the z-loss weight :attr:`MoE.z_weight`) to the backward
where its output's gradient arrives (:class:`_AuxGrad`). The same holds when the block's forward is
recomputed: under activation checkpointing the recomputation reuses the forward's expert choice
and records nothing, and under StreamBP each chunk's recomputation injects the weights of its own
tokens, so nothing is counted twice and the counts are always those of the whole sequence.

Layout legend: x_th [tokens, hidden]; probs_te [tokens, experts]; experts_tk/weights_tk
[tokens, top_k]; x_nh [assignments sorted by expert, hidden].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.models.args import ModelArgs

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _call(module: nn.Module, *args):
    return module(*args)


@dataclass
class Routing:
    """What the router decided in one forward of one MoE block."""

    experts: torch.Tensor
    """[T, top_k] selected expert ids (int64, detached)."""
    counts: torch.Tensor
    """[E] assignments each expert computed (after capacity dropping), int64, detached."""
    row_counts: torch.Tensor
    """[B, E] assignments the router selected per row (before capacity dropping), fp32, detached."""
    prob_sums: torch.Tensor
    """[B, E] sum over each row's tokens of the router probabilities, fp32 (fp64 in an fp64 model)."""
    lse_sq_sum: Optional[torch.Tensor] = None
    """Sum over the tokens of logsumexp(router logits)^2 (the router z-loss's sum); only when
    :attr:`MoE.z_weight` is set."""


class _AuxGrad(torch.autograd.Function):
    """Identity on the block's output whose backward also sends the auxiliary losses' gradient into
    the router: ``block.aux_weights`` into the per-row probability sums and ``block.z_weight`` into
    the sum of squared router log-sum-exps (both read when the backward runs, after the balancer
    has set them from the whole micro-batch's expert counts)."""

    @staticmethod
    def forward(ctx, out, prob_sums_be, lse_sq_sum, block):
        ctx.block = block
        ctx.shapes = (prob_sums_be.shape, prob_sums_be.dtype, lse_sq_sum is not None)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        block = ctx.block
        shape, dtype, has_z = ctx.shapes
        weights = block.aux_weights if block.aux_grad else None
        if block.aux_grad and weights is None:
            raise RuntimeError("MoE balancing: the backward ran before the balancer set the block's aux_weights "
                               "(call Balancer.after_forward between a micro-batch's forward and its backward)")
        d_probs = None if weights is None else weights.to(dtype).expand(shape)
        d_z = torch.full((), block.z_weight, dtype=dtype, device=grad_out.device) if has_z else None
        return grad_out, d_probs, d_z, None


class Experts(nn.Module):
    """``num_experts`` SwiGLU experts stored as stacked weights for a grouped matrix product."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_nh: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each row of ``x_nh`` by its expert: rows sorted by expert, ``counts[e]`` rows
        for expert e. Returns [N, hidden]."""
        if use_grouped_mm(x_nh):  # autocast does not cover _grouped_mm: cast by hand
            dtype, offs = torch.bfloat16, torch.cumsum(counts, 0, dtype=torch.int32)
            gate_up = _grouped_mm(x_nh.to(dtype), self.gate_up_proj.to(dtype).transpose(-2, -1), offs=offs)
            gate, up = gate_up.chunk(2, dim=-1)
            return _grouped_mm(F.silu(gate) * up, self.down_proj.to(dtype).transpose(-2, -1), offs=offs)
        return self.reference(x_nh, counts)

    def reference(self, x_nh: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The CPU path: one SwiGLU per expert over its contiguous segment of ``x_nh``."""
        out = []
        for e, seg in enumerate(x_nh.split(counts.tolist())):
            gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)
            out.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        return torch.cat(out) if out else x_nh.new_zeros(0, self.down_proj.shape[1])


def use_grouped_mm(x: torch.Tensor) -> bool:
    """Whether the experts run as one ``torch._grouped_mm``: CUDA, bf16 (the tensors' or autocast's)
    and a torch that has it."""
    if _grouped_mm is None or not x.is_cuda:
        return False
    autocast = torch.is_autocast_enabled("cuda")
    return (torch.get_autocast_dtype("cuda") if autocast else x.dtype) == torch.bfloat16


class MoE(nn.Module):
    """The MoE block that replaces a decoder layer's MLP; parameter names match HF's ``mlp.*``
    (``gate.weight``, ``experts.gate_up_proj``, ``experts.down_proj``, ``shared_experts.*``).

    Args:
        args: the model geometry (num_experts > 0).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        from longtrain.models.llama import MLP  # llama imports this module

        self.num_experts, self.top_k = args.num_experts, args.top_k
        self.norm_topk_prob, self.capacity_factor = args.norm_topk_prob, args.capacity_factor
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args.num_experts, args.hidden_size, args.expert_size)
        self.shared_experts = MLP(args, args.shared_size) if args.num_shared_experts else None
        self.last_routing: Optional[Routing] = None
        self.aux_grad = False
        """Whether the backward adds the balancing loss's gradient (:attr:`aux_weights`)."""
        self.aux_weights: Optional[torch.Tensor] = None
        """[B or 1, E] gradient of the total loss w.r.t. each row's router probability sums
        (set by the balancer after the forward; None: no balancing-loss gradient)."""
        self.z_weight: Optional[float] = None
        """Gradient of the total loss w.r.t. :attr:`Routing.lse_sq_sum`; None: no z-loss."""
        self.expert_bias: Optional[torch.Tensor] = None
        """[E] fp32 bias added to the probabilities for the top-k choice only (auxiliary-loss-free
        balancing); the weights stay the unbiased probabilities."""

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Assignments one expert may compute for ``num_tokens`` tokens; None: unlimited."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x_bsh: torch.Tensor, routing: Optional[torch.Tensor] = None, stash: bool = True,
                call: Callable = _call) -> torch.Tensor:
        """The block's output [B, S, hidden] for its normed input ``x_bsh``.

        Args:
            x_bsh: [B, S, hidden] input (after post_attention_layernorm).
            routing: [B*S, top_k] expert ids to use instead of the router's top-k (the weights are
                still the router's probabilities of those experts); StreamBP passes the forward's
                choice so that its chunked recomputation routes every token identically.
            stash: record :attr:`last_routing`.
            call: how submodules are called (StreamBP bypasses their hooks).
        """
        b, s, h = x_bsh.shape
        if routing is None and stash and _in_backward() and self.last_routing is not None:
            # Activation checkpointing recomputes this forward inside the backward: route as the
            # forward did (a near-tie must not flip) and record nothing (counts stay the forward's).
            routing, stash = self.last_routing.experts, False
        x_th = x_bsh.reshape(b * s, h)
        logits_te = call(self.gate, x_th)
        probs_te = torch.softmax(logits_te, dim=-1, dtype=torch.promote_types(logits_te.dtype, torch.float32))
        if routing is None:
            # The choice carries no gradient (the weights are gathered below), so the forward and a
            # recomputation given the choice record the same graph.
            scores_te = probs_te.detach() if self.expert_bias is None else probs_te.detach() + self.expert_bias
            experts_tk = torch.topk(scores_te, self.top_k, dim=-1).indices
        else:
            experts_tk = routing
        weights_tk = probs_te.gather(-1, experts_tk)
        if self.norm_topk_prob:
            weights_tk = weights_tk / weights_tk.sum(dim=-1, keepdim=True)
        # Sort the T*k assignments by expert; a stable sort keeps token order inside an expert, so
        # capacity keeps each expert's earliest tokens.
        flat_experts = experts_tk.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        capacity = self.capacity(b * s)
        if capacity is not None:
            starts = torch.cumsum(counts, 0) - counts
            rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_experts[order]]
            order = order[rank_in_expert < capacity]
            counts = counts.clamp(max=capacity)
        y_nh = call(self.experts, x_th[order // self.top_k], counts)
        y_th = y_nh.new_zeros(b * s * self.top_k, h).index_copy(0, order, y_nh)  # dropped rows stay 0
        out_th = (y_th.view(b * s, self.top_k, h) * weights_tk.to(y_th.dtype).unsqueeze(-1)).sum(dim=1)
        if self.shared_experts is not None:
            mlp = self.shared_experts
            out_th = out_th + call(mlp.down_proj, F.silu(call(mlp.gate_proj, x_th)) * call(mlp.up_proj, x_th))
        out_bsh = out_th.view(b, s, h)
        prob_sums_be = probs_te.view(b, s, -1).sum(dim=1)
        lse_sq_sum = torch.logsumexp(logits_te.to(probs_te.dtype), dim=-1).square().sum() \
            if self.z_weight is not None else None
        if stash:
            row_offset = torch.arange(b, device=flat_experts.device).unsqueeze(1) * self.num_experts
            row_counts = torch.bincount((experts_tk.view(b, -1) + row_offset).reshape(-1),
                                        minlength=b * self.num_experts).view(b, -1)
            self.last_routing = Routing(experts_tk.detach(), counts.detach(), row_counts.float(),
                                        prob_sums_be.detach(),
                                        None if lse_sq_sum is None else lse_sq_sum.detach())
        if torch.is_grad_enabled() and (self.aux_grad or lse_sq_sum is not None):
            out_bsh = _AuxGrad.apply(out_bsh, prob_sums_be, lse_sq_sum, self)
        return out_bsh


def _in_backward() -> bool:
    """Whether autograd is running a backward now (a checkpointed forward being recomputed)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def moe_blocks(model: nn.Module) -> List[MoE]:
    """The MoE blocks of ``model`` in layer order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_outputs(model: nn.Module) -> List[Optional[Routing]]:
    """Each MoE block's :attr:`MoE.last_routing` from the latest forward, in layer order."""
    return [m.last_routing for m in moe_blocks(model)]
