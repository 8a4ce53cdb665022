"""FLOPs of one dispatched op, and the workspace CUDA's attention backward allocates inside itself.

Matmuls and SDPA are counted by :data:`torch.utils.flop_counter.flop_registry`; the CPU
flash-attention ops it lacks, the in-place ``addmm_`` and the flash varlen ops (by their visible
(query, key) pairs) here. Causal attention counts only what the kernels compute: half the square
score matrix, or the visible pairs under bottom-right alignment.
"""
from __future__ import annotations

from typing import List

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten


def _cpu_flash_flops(q, k, v, is_causal: bool, backward: bool) -> int:
    """[B, H, S, D] SDPA: 2 matmuls forward (scores, weighted sum), 4 backward; causal halves."""
    b, h, s_q, d = q.shape
    s_k = k.shape[-2]
    flops = 4 * b * h * s_q * s_k * d * (2 if backward else 1)
    return flops // 2 if is_causal and s_q == s_k else flops


def _visible_pairs(num_q: int, num_k: int, causal: bool) -> int:
    """(query, key) pairs a flash kernel computes: all, or under bottom-right causal alignment
    (query ``i`` sees keys up to ``i + num_k - num_q``) those not masked."""
    if not causal:
        return num_q * num_k
    if num_k >= num_q:
        return num_q * num_k - num_q * (num_q - 1) // 2
    return num_k * (num_k + 1) // 2


def _lengths(cum_seq: torch.Tensor) -> List[int]:
    with unset_fake_temporarily():  # a real (integer bookkeeping) tensor inside the fake step
        return (cum_seq[1:] - cum_seq[:-1]).tolist()


def _flash_flops(args, backward: bool) -> int:
    """``aten._flash_attention_forward`` / ``_backward``: 2 matmuls forward, 4 backward, over the
    visible pairs of every sequence (varlen: ``cum_seq_q`` / ``cum_seq_k``; dense: [B, S, H, D])."""
    q, k = (args[1], args[2]) if backward else (args[0], args[1])
    cum_q, cum_k, causal = (args[6], args[7], args[11]) if backward else (args[3], args[4], args[8])
    heads, dim = q.shape[-2], q.shape[-1]
    if cum_q is None:
        pairs = q.shape[0] * _visible_pairs(q.shape[1], k.shape[1], bool(causal))
    else:
        pairs = sum(_visible_pairs(a, b, bool(causal)) for a, b in zip(_lengths(cum_q), _lengths(cum_k)))
    return 4 * heads * dim * pairs * (2 if backward else 1)


def flash_backward_workspace(q: torch.Tensor, k: torch.Tensor, batch: int, varlen: bool) -> int:
    """Bytes flash attention 2's backward allocates inside the op on CUDA (``mha_bwd`` /
    ``mha_varlen_bwd``): an fp32 dQ accumulator and softmax row sums over the queries padded by 128
    per sequence, the head size rounded up to 32; with grouped-query attention also dK and dV
    expanded to every query head, summed afterwards. ``q``/``k``: [total, H, D] (varlen) or
    [B, S, H, D]."""
    heads, dim = q.shape[-2], q.shape[-1]
    dim_rounded = -(-dim // 32) * 32 if dim <= 192 else 256
    rows = q.shape[0] + 128 * batch if varlen else batch * (-(-q.shape[1] // 128) * 128)
    work = 4 * heads * rows * (dim_rounded + 1)
    if k.shape[-2] != heads:
        work += 2 * (k.numel() // k.shape[-2]) * heads * q.element_size()
    return work


def workspace_bytes(func, args) -> int:
    """Bytes a CUDA attention backward allocates and frees inside the op (0 for other ops)."""
    packet = func._overloadpacket
    if packet is aten._flash_attention_backward:
        q, k, cum_q = args[1], args[2], args[6]
        return flash_backward_workspace(q, k, cum_q.numel() - 1 if cum_q is not None else q.shape[0],
                                        cum_q is not None)
    if packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:  # stands for CUDA's flash
        q, k = args[1].transpose(1, 2), args[2].transpose(1, 2)
        return flash_backward_workspace(q, k, q.shape[0], False)
    return 0


_IN_PLACE = {aten.addmm_: aten.addmm, aten.baddbmm_: aten.baddbmm}
"""In-place matmuls the registry knows only out of place (same FLOPs)."""


def _sdpa_causal(func, args, kwargs) -> bool:
    names = [a.name for a in func._schema.arguments]
    if "is_causal" in kwargs:
        return bool(kwargs["is_causal"])
    if "is_causal" not in names:
        return False
    i = names.index("is_causal")
    return bool(args[i]) if i < len(args) else False


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of one dispatched op (0 for ops that are not matmuls or attention)."""
    packet = func._overloadpacket
    if packet is aten._scaled_dot_product_flash_attention_for_cpu:
        return _cpu_flash_flops(args[0], args[1], args[2], _sdpa_causal(func, args, kwargs), False)
    if packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:
        return _cpu_flash_flops(args[1], args[2], args[3], _sdpa_causal(func, args, kwargs), True)
    if packet in (aten._flash_attention_forward, aten._flash_attention_backward):
        return _flash_flops(args, packet is aten._flash_attention_backward)
    formula = flop_registry.get(_IN_PLACE.get(packet, packet))
    if formula is None:
        return 0
    flops = int(formula(*args, **kwargs, out_val=out))
    if "attention" in packet.__name__ and _sdpa_causal(func, args, kwargs):
        q, k = (args[1], args[2]) if "backward" in packet.__name__ else (args[0], args[1])
        if q.shape[-2] == k.shape[-2]:  # the registry counts the whole score matrix
            flops //= 2
    return flops


__all__ = ["flash_backward_workspace", "op_flops", "workspace_bytes"]
