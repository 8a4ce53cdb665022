"""cuDNN executor of dense attention blocks (:mod:`longtrain.kernels.dispatch` decides where it runs).

SDPA's cuDNN backend runs causal attention faster than the flash backend on Hopper (on an H100:
440 against 292 TFLOP/s forward + backward at d=64). Its ops return and take the log-sum-exp the
ring's merges need:

    aten::_scaled_dot_product_cudnn_attention(query, key, value, attn_bias, compute_log_sumexp,
        dropout_p, is_causal, return_debug_mask, *, scale) -> (output, logsumexp [B, H, S, 1] fp32,
        cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug_attn_mask)
    aten::_scaled_dot_product_cudnn_attention_backward(grad_out, query, key, value, out,
        logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q, cum_seq_k, max_q, max_k,
        dropout_p, is_causal, *, scale) -> (dq, dk, dv)

(schemas as of torch 2.13; tensors ``[B, H, S, D]``). They take no varlen segments, so they run
only the two dense kinds of block:

- ``causal``: queries and keys carry the same indices (the ring's diagonal block, a whole
  sequence as one block): causal attention of a square block;
- ``full``: every key precedes every query (the ring's earlier blocks): attention without a mask;

and only without document ids. Every other block (packed documents, partial diagonals) goes to
the flash varlen kernels of :mod:`longtrain.kernels.fused`, as do inputs cuDNN does not take.
Grouped-query attention: keys and values are repeated per query head for the cuDNN call and their
gradients summed back over each group.

Which blocks run here (the backend ``auto``, ``flash`` or ``cudnn``, the availability and timing
probes, the fallback when cuDNN raises) is :class:`~longtrain.kernels.dispatch.AttentionKernels`'
choice; this module holds the executor, the block classification and the timing helper.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch


_PHILOX: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def dense_kind(q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: Optional[torch.Tensor],
               k_doc: Optional[torch.Tensor]) -> Optional[str]:
    """``"causal"`` (same strictly increasing indices), ``"full"`` (every key before every query)
    or None (documents, or any other layout: not a dense block)."""
    if q_doc is not None or k_doc is not None or q_idx.numel() == 0 or k_idx.numel() == 0:
        return None
    q_cpu, k_cpu = q_idx.detach().cpu(), k_idx.detach().cpu()
    if bool(k_cpu.max() < q_cpu.min()):
        return "full"
    if q_cpu.shape == k_cpu.shape and bool((q_cpu == k_cpu).all()) and (
            q_cpu.numel() == 1 or bool((q_cpu[1:] > q_cpu[:-1]).all())):
        return "causal"
    return None


# ---------------------------------------------------------------------------- the cuDNN executor
def _ops():
    """(forward op, backward op); a function so that CPU tests can stand in for them."""
    return (torch.ops.aten._scaled_dot_product_cudnn_attention,
            torch.ops.aten._scaled_dot_product_cudnn_attention_backward)


def _expand_kv(x_bshd: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // x_bshd.shape[2]
    return x_bshd if group == 1 else x_bshd.repeat_interleave(group, dim=2)


def cudnn_forward(q_bshd, k_bshd, v_bshd, kind: str, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out_bshd, lse_bhs fp32) of a dense block on the cuDNN op."""
    heads = q_bshd.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q_bshd, _expand_kv(k_bshd, heads), _expand_kv(v_bshd, heads)))
    res = _ops()[0](q, k, v, None, True, 0.0, kind == "causal", False,
                                                              scale=scale)
    key = str(q_bshd.device)
    if key not in _PHILOX:
        _PHILOX[key] = (res[6], res[7])
    lse = res[1].reshape(q.shape[0], heads, q.shape[2]).float()
    return res[0].transpose(1, 2), lse


def cudnn_backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, kind: str, scale: float):
    """(dq, dk, dv) of a dense block on the cuDNN backward op, from the given (merged) out and lse."""
    batch, num_q, heads, dim = q_bshd.shape
    num_k, kv_heads = k_bshd.shape[1], k_bshd.shape[2]
    q, k, v, out, dout = (t.transpose(1, 2) for t in (q_bshd, _expand_kv(k_bshd, heads),
                                                      _expand_kv(v_bshd, heads), out_bshd.to(q_bshd.dtype),
                                                      dout_bshd.contiguous()))
    seed, offset = _PHILOX.get(str(q_bshd.device), (None, None))
    if seed is None:
        empty = torch.empty((), dtype=torch.long, device=q_bshd.device)
        seed, offset = empty, empty
    lse = lse_bhs.float().reshape(batch, heads, num_q, 1).contiguous()
    dq, dk, dv = _ops()[1](
        dout, q, k, v, out, lse, seed, offset, None, None, None, num_q, num_k, 0.0, kind == "causal", scale=scale)
    dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    group = heads // kv_heads
    if group > 1:
        dk = dk.float().reshape(batch, num_k, kv_heads, group, dim).sum(3)
        dv = dv.float().reshape(batch, num_k, kv_heads, group, dim).sum(3)
    return dq.to(q_bshd.dtype), dk.to(k_bshd.dtype), dv.to(v_bshd.dtype)


def shape_class(q_bshd: torch.Tensor, k_bshd: torch.Tensor, kind: str) -> tuple:
    """The key of one auto choice: device, dtype, heads, head size, kind, lengths up to a power of 2."""
    def up(n: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(n, 1))))
    return (str(q_bshd.device), str(q_bshd.dtype), q_bshd.shape[0], q_bshd.shape[2], k_bshd.shape[2],
            q_bshd.shape[3], kind, up(q_bshd.shape[1]), up(k_bshd.shape[1]))


def measure_ms(pair, q_bshd, k_bshd, v_bshd, kind: str, scale: float, repeats: int = 3) -> float:
    """Median forward + backward milliseconds of ``pair`` (one warm-up first) on these shapes."""
    dout = torch.randn_like(q_bshd)
    pair(q_bshd, k_bshd, v_bshd, dout, kind, scale)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pair(q_bshd, k_bshd, v_bshd, dout, kind, scale)
        end.record()
        torch.cuda.synchronize(q_bshd.device)
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
