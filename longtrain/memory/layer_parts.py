"""The parts of a decoder layer that StreamBP's backward recomputes for a slice of tokens, run
without the modules' hooks (with a parameter gather, ZeRO-3, the streamed backward gathers a
layer's parameters once, and the per-module hooks would gather and release them again around every
call, once per chunk).

Layouts: ``x_bsh`` [B, S, hidden]; ``q_bshd`` [B, S, Hq, D]; ``k_bshd``/``v_bshd`` [B, S, Hkv, D].
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from longtrain.models.llama import DecoderLayer, apply_rope
from longtrain.models.moe import MoE


def run(module: nn.Module, *args):
    """``module(*args)`` without its hooks (module docstring)."""
    return module.forward(*args)


def mlp_branch(layer: DecoderLayer, h_bsh: torch.Tensor, routing_bsk: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The MLP half's residual branch, ``mlp(post_attention_layernorm(h))``, through :func:`run`.
    An MoE block routes by ``routing_bsk`` (the forward's expert ids) when given, and records its
    routing only when not (i.e. in a forward, not in a recomputation)."""
    mlp = layer.mlp
    x = run(layer.post_attention_layernorm, h_bsh)
    if isinstance(mlp, MoE):
        routing = None if routing_bsk is None else routing_bsk.reshape(-1, routing_bsk.shape[-1])
        return mlp.forward(x, routing=routing, stash=routing is None, call=run)
    return run(mlp.down_proj, torch.nn.functional.silu(run(mlp.gate_proj, x)) * run(mlp.up_proj, x))


def _keys_values(layer: DecoderLayer, h_bsh: torch.Tensor, cos_bsd: torch.Tensor,
                 sin_bsd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    b, s, _ = h_bsh.shape
    k_bshd = run(attn.k_proj, h_bsh).view(b, s, attn.num_kv_heads, attn.head_dim)
    v_bshd = run(attn.v_proj, h_bsh).view(b, s, attn.num_kv_heads, attn.head_dim)
    if attn.qk_norm:  # in v's precision, as Attention.forward: the fused kernels take half precision only
        k_bshd = run(attn.k_norm, k_bshd).to(v_bshd.dtype)
    return apply_rope(k_bshd, cos_bsd, sin_bsd), v_bshd


def _queries(layer: DecoderLayer, h_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    attn = layer.self_attn
    b, s, _ = h_bsh.shape
    q_bshd = run(attn.q_proj, h_bsh).view(b, s, attn.num_heads, attn.head_dim)
    if attn.qk_norm:
        q_bshd = run(attn.q_norm, q_bshd).to(dtype)
    return apply_rope(q_bshd, cos_bsd, sin_bsd)


def keys_values(layer: DecoderLayer, x_bsh: torch.Tensor, cos_bsd: torch.Tensor,
                sin_bsd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """K (after k-norm and RoPE) and V of the tokens of ``x_bsh``."""
    return _keys_values(layer, run(layer.input_layernorm, x_bsh), cos_bsd, sin_bsd)


def queries(layer: DecoderLayer, x_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Q (after q-norm, in ``dtype``, v's precision as Attention.forward casts it, and RoPE) of the
    tokens of ``x_bsh``."""
    return _queries(layer, run(layer.input_layernorm, x_bsh), cos_bsd, sin_bsd, dtype)


def queries_keys_values(layer: DecoderLayer, x_bsh: torch.Tensor, cos_bsd: torch.Tensor,
                        sin_bsd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of the tokens of ``x_bsh`` (as :func:`queries` and :func:`keys_values`), the input
    norm computed once."""
    h_bsh = run(layer.input_layernorm, x_bsh)
    k_bshd, v_bshd = _keys_values(layer, h_bsh, cos_bsd, sin_bsd)
    return _queries(layer, h_bsh, cos_bsd, sin_bsd, v_bshd.dtype), k_bshd, v_bshd


def whole_in_chunks(parts_of, x_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
                    chunk: int) -> Tuple[torch.Tensor, ...]:
    """``parts_of(layer inputs of a chunk)`` (e.g. :func:`keys_values`) for the whole sequence, computed
    ``chunk`` tokens at a time into whole-sequence buffers: the norm's fp32 copies and the projections'
    outputs of one chunk exist at a time, not of the whole sequence (meant without autograd)."""
    whole: List[torch.Tensor] = []
    seq = x_bsh.shape[1]
    for start in range(0, seq, chunk):
        end = min(start + chunk, seq)
        parts = parts_of(x_bsh[:, start:end], cos_bsd[:, start:end], sin_bsd[:, start:end])
        if not whole:
            whole = [p.new_empty((p.shape[0], seq, *p.shape[2:])) for p in parts]
        for buffer, part in zip(whole, parts):
            buffer[:, start:end] = part
    return tuple(whole)


def accumulate(acc: List[Optional[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> None:
    """Add ``grads`` into ``acc`` in place, position by position (None: nothing to add)."""
    for i, g in enumerate(grads):
        if g is not None:
            acc[i] = g if acc[i] is None else acc[i] + g
