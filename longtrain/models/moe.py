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

Router outputs for load balancing. After each forward the block keeps ``last_routing``, a
:class:`Routing` with the selected experts [T, k] and the kept assignments per expert [E]
(detached; T = batch * seq tokens of this rank); with ``keep_router_probs`` set (by the balancing
loss, see :func:`set_keep_router_probs`) it also keeps the fp32 router probabilities [T, E] with
their autograd graph, so a loss built from them back-propagates into the router.
:func:`router_outputs` lists the blocks' ``last_routing`` in layer order. Under StreamBP the layer's
forward runs without autograd, so the kept probabilities carry no graph there.

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
    probs: Optional[torch.Tensor] = None
    """[T, E] softmax of the router logits (fp32, fp64 in an fp64 model) with its graph; only with
    ``keep_router_probs``."""


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
        self.keep_router_probs = False
        self.last_routing: Optional[Routing] = None

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
        x_th = x_bsh.reshape(b * s, h)
        logits_te = call(self.gate, x_th)
        probs_te = torch.softmax(logits_te, dim=-1, dtype=torch.promote_types(logits_te.dtype, torch.float32))
        if routing is None:
            weights_tk, experts_tk = torch.topk(probs_te, self.top_k, dim=-1)
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
        if stash:
            self.last_routing = Routing(experts_tk.detach(), counts.detach(),
                                        probs_te if self.keep_router_probs else None)
        return out_th.view(b, s, h)


def moe_blocks(model: nn.Module) -> List[MoE]:
    """The MoE blocks of ``model`` in layer order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_outputs(model: nn.Module) -> List[Optional[Routing]]:
    """Each MoE block's :attr:`MoE.last_routing` from the latest forward, in layer order."""
    return [m.last_routing for m in moe_blocks(model)]


def set_keep_router_probs(model: nn.Module, enabled: bool) -> None:
    """Make every MoE block keep its router probabilities (with their graph) after each forward."""
    for m in moe_blocks(model):
        m.keep_router_probs = bool(enabled)
