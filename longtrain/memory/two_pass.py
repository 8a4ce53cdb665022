"""StreamBP for a layer whose attention does not stream its keys: ring and hybrid layouts, whose
keys live on other ranks, and any attention function without ``chunk_keys``.

The attention core (Q, K, V -> output) runs whole through the attention function's own autograd,
once to recompute it and once for its backward (under ring attention: one ring pass each, the
bytes of one checkpointed ring attention; the ring's block kernels tile the queries themselves),
and everything around it streams in chunks of tokens:

1. Without autograd, chunk by chunk: Q, K, V of this rank's tokens (norm, projections, q/k-norm,
   RoPE) into whole-sequence buffers; then the attention output, with autograd on Q, K, V only.
2. Chunk by chunk, with autograd: the output projection, the residual and the MLP half, on the
   chunk's attention output as a leaf. Its backward gives the chunk's share of the input gradient
   and of the weight gradients, and the attention output's gradient.
3. The attention core's backward (the ring's second pass): dQ, dK, dV of this rank's tokens.
4. Chunk by chunk, with autograd: Q, K, V again from the chunk's input, back-propagated with their
   gradients: the rest of the input gradient and of the norm and projection weight gradients.

Whole-sequence tensors held: Q, K, V, the attention output and its gradient, and what the attention
function saves itself (the ring's log-sum-exp); no full-sequence activation of the norm, the
projections or the MLP exists. Each token's input gradient gets two additions (steps 2 and 4), as
in the streamed path. Every part runs without module hooks (:mod:`longtrain.memory.layer_parts`),
so a layer whose parameters a ZeRO-3 gather holds whole streams under every layout.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from longtrain.memory.layer_parts import accumulate, mlp_branch, queries_keys_values, run, whole_in_chunks
from longtrain.models.llama import DecoderLayer


def attention_half_whole(layer: DecoderLayer, chunk: int, x_bsh: torch.Tensor, cos_bsd: torch.Tensor,
                         sin_bsd: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + attn(norm(x))`` of the whole sequence as the layer's forward computes it, without the
    modules' hooks (the forward of a layer whose parameters a gather holds), Q, K and V made
    ``chunk`` tokens at a time (meant without autograd)."""
    attn = layer.self_attn
    q_bshd, k_bshd, v_bshd = _whole_qkv(layer, x_bsh, cos_bsd, sin_bsd, chunk)
    out_bshd = attn.attn_fn(q_bshd, k_bshd, v_bshd, doc_ids=doc_ids, scale=attn.scale)
    return x_bsh + run(attn.o_proj, out_bshd.reshape(*x_bsh.shape[:2], -1))


def _spans(seq: int, chunk: int) -> List[Tuple[int, int]]:
    return [(start, min(start + chunk, seq)) for start in range(0, seq, chunk)]


def _whole_qkv(layer: DecoderLayer, x_bsh, cos_bsd, sin_bsd, chunk: int) -> Tuple[torch.Tensor, ...]:
    """Step 1's Q, K, V of the whole sequence, computed chunk by chunk into preallocated buffers."""
    return whole_in_chunks(lambda x, cos, sin: queries_keys_values(layer, x, cos, sin), x_bsh, cos_bsd, sin_bsd,
                           chunk)


def backward_attention_whole(layer: DecoderLayer, chunk: int, x_bsh: torch.Tensor, dout_bsh: torch.Tensor,
                             cos_bsd: torch.Tensor, sin_bsd: torch.Tensor, doc_ids: Optional[torch.Tensor],
                             params: Sequence[torch.Tensor], routing_bsk: Optional[torch.Tensor] = None):
    """The layer's backward with the attention core whole and the rest streamed (module docstring).

    Returns:
        (dx_bsh, dparams): the input's gradient and one gradient (or None) per ``params``.
    """
    attn, spans = layer.self_attn, _spans(x_bsh.shape[1], chunk)
    with torch.no_grad():
        q_bshd, k_bshd, v_bshd = _whole_qkv(layer, x_bsh, cos_bsd, sin_bsd, chunk)
    with torch.enable_grad():
        leaves = [t.requires_grad_() for t in (q_bshd, k_bshd, v_bshd)]
        out_bshd = attn.attn_fn(*leaves, doc_ids=doc_ids, scale=attn.scale)
    out_detached = out_bshd.detach()
    dattn_bshd = torch.empty_like(out_detached)
    dx_bsh = torch.zeros_like(x_bsh)
    dparams: List[Optional[torch.Tensor]] = [None] * len(params)
    for start, end in spans:  # step 2: output projection, residual, MLP
        with torch.enable_grad():
            x_bch = x_bsh[:, start:end].requires_grad_()
            o_bchd = out_detached[:, start:end].requires_grad_()
            h_bch = x_bch + run(attn.o_proj, o_bchd.reshape(*x_bch.shape[:2], -1))
            routing_bck = None if routing_bsk is None else routing_bsk[:, start:end]
            y_bch = h_bch + mlp_branch(layer, h_bch, routing_bck)
        grads = torch.autograd.grad(y_bch, [x_bch, o_bchd, *params], dout_bsh[:, start:end], allow_unused=True)
        dx_bsh[:, start:end] += grads[0]
        dattn_bshd[:, start:end] = grads[1]
        accumulate(dparams, grads[2:])
    del out_detached
    dqkv = torch.autograd.grad(out_bshd, leaves, dattn_bshd)  # step 3: the attention core's backward
    del out_bshd, dattn_bshd, leaves, q_bshd, k_bshd, v_bshd
    for start, end in spans:  # step 4: Q, K, V back to the input and the projections
        with torch.enable_grad():
            x_bch = x_bsh[:, start:end].requires_grad_()
            parts = queries_keys_values(layer, x_bch, cos_bsd[:, start:end], sin_bsd[:, start:end])
        grads = torch.autograd.grad(parts, [x_bch, *params], [g[:, start:end] for g in dqkv], allow_unused=True)
        dx_bsh[:, start:end] += grads[0]
        accumulate(dparams, grads[1:])
    return dx_bsh, dparams
