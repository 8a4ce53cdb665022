"""cuDNN block kernels for the dense blocks of ring attention, flash attention for the rest.

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

Choice, per call (``LONGTRAIN_ATTN_BACKEND``):

- ``flash``: always the flash kernels (the behaviour before this module);
- ``cudnn``: cuDNN for every dense block it takes;
- ``auto`` (default): cuDNN where a timing probe on the first block of each shape class (device,
  dtype, head counts, head size, block kind, query and key lengths rounded up to a power of two)
  found it faster than flash for forward + backward.

cuDNN is used only after an availability probe on the first use per device: a small causal and
full block through both backends, forward and backward, must agree (bf16 tolerance). A failing
or raising probe, or a cuDNN call that raises later, switches the device to flash for good
(``CUDNN_STATS.disabled`` says why). :data:`CUDNN_STATS` counts the calls each backend ran.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from longtrain.kernels.blocks import check_docs, check_shapes, register_block_kernels
from longtrain.kernels.fused import fused_block_backward, fused_block_forward

BACKEND_ENV = "LONGTRAIN_ATTN_BACKEND"
BACKENDS = ("auto", "flash", "cudnn")
_CUDNN_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class CudnnStats:
    """Block calls per backend, the auto choices made (shape class -> backend and the probe's
    milliseconds), and per device why cuDNN was switched off."""

    cudnn: int = 0
    flash: int = 0
    choices: Dict[tuple, dict] = field(default_factory=dict)
    disabled: Dict[str, str] = field(default_factory=dict)


CUDNN_STATS = CudnnStats()
_AVAILABLE: Dict[str, bool] = {}
_PHILOX: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def requested_backend() -> str:
    """The backend ``LONGTRAIN_ATTN_BACKEND`` asks for (``auto`` when unset)."""
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


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


def eligible(q_bshd: torch.Tensor) -> bool:
    """Whether cuDNN could take these queries at all (CUDA, half precision, head size)."""
    return (q_bshd.is_cuda and q_bshd.dtype in _CUDNN_DTYPES and q_bshd.shape[-1] % 8 == 0
            and q_bshd.shape[-1] <= 128 and torch.backends.cudnn.is_available())


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


# ---------------------------------------------------------------------------- probes
def _disable(device: torch.device, why: str) -> None:
    _AVAILABLE[str(device)] = False
    CUDNN_STATS.disabled[str(device)] = why


def _flash_pair(q, k, v, dout, kind, scale):
    idx = torch.arange(q.shape[1], device=q.device)
    q_idx = idx + (k.shape[1] if kind == "full" else 0)
    k_idx = torch.arange(k.shape[1], device=q.device)
    out, lse = fused_block_forward(q, k, v, q_idx, k_idx, None, None, scale)
    return (out, lse, *fused_block_backward(dout, q, k, v, out, lse, q_idx, k_idx, None, None, scale))


def _cudnn_pair(q, k, v, dout, kind, scale):
    out, lse = cudnn_forward(q, k, v, kind, scale)
    return (out, lse, *cudnn_backward(dout, q, k, v, out, lse, kind, scale))


def cudnn_available(device: torch.device) -> bool:
    """Probe once per device: cuDNN and flash must agree on a small causal and full block."""
    key = str(device)
    if key not in _AVAILABLE:
        try:
            gen = torch.Generator().manual_seed(0)
            q, dout = (torch.randn(1, 256, 4, 64, generator=gen).to(device, torch.bfloat16) for _ in range(2))
            k, v = (torch.randn(1, 256, 2, 64, generator=gen).to(device, torch.bfloat16) for _ in range(2))
            for kind in ("causal", "full"):
                for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), _cudnn_pair(q, k, v, dout, kind, 0.125),
                                           _flash_pair(q, k, v, dout, kind, 0.125)):
                    err = (got.float() - want.float()).abs().max().item()
                    if not err <= 3e-2 * (want.float().abs().max().item() + 1.0):
                        raise RuntimeError(f"{kind} {name} differs from flash by {err:.3g}")
            _AVAILABLE[key] = True
        except Exception as exc:  # no cuDNN attention on this build/GPU, or a wrong answer
            _disable(device, f"probe: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return _AVAILABLE[key]


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


def choose_backend(q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor, kind: Optional[str],
                   scale: float) -> str:
    """``"cudnn"`` or ``"flash"`` for one block (module docstring)."""
    want = requested_backend()
    if want == "flash" or kind is None or not eligible(q_bshd) or not cudnn_available(q_bshd.device):
        return "flash"
    if want == "cudnn":
        return "cudnn"
    key = shape_class(q_bshd, k_bshd, kind)
    if key not in CUDNN_STATS.choices:
        try:
            with torch.no_grad():
                plain = tuple(t.detach() for t in (q_bshd, k_bshd, v_bshd))
                ms = {"cudnn": measure_ms(_cudnn_pair, *plain, kind, scale),
                      "flash": measure_ms(_flash_pair, *plain, kind, scale)}
            CUDNN_STATS.choices[key] = dict(backend=min(ms, key=ms.get), ms=ms)
        except Exception as exc:
            _disable(q_bshd.device, f"timing probe: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            return "flash"
    return CUDNN_STATS.choices[key]["backend"]


# ---------------------------------------------------------------------------- the block kernels
def _dispatch(what: str, q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale, on_cudnn, on_flash):
    """``on_cudnn(kind)`` for a dense block where cuDNN is chosen, else (and once cuDNN has raised
    anything but an out-of-memory error, which switches it off for the device) ``on_flash()``."""
    check_shapes(q_bshd, k_bshd, v_bshd, q_idx, k_idx)
    check_docs(q_doc, k_doc)
    kind = dense_kind(q_idx, k_idx, q_doc, k_doc)
    if choose_backend(q_bshd, k_bshd, v_bshd, kind, scale) == "cudnn":
        try:
            res = on_cudnn(kind)
            CUDNN_STATS.cudnn += 1
            return res
        except RuntimeError as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            _disable(q_bshd.device, f"{what}: {str(exc).splitlines()[0][:200]}")
    CUDNN_STATS.flash += 1
    return on_flash()


def cudnn_block_forward(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale):
    """:func:`~longtrain.kernels.blocks.block_attention_forward`: cuDNN for dense blocks where
    chosen, else (and on any cuDNN error) the fused flash kernels."""
    return _dispatch("forward", q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale,
                     lambda kind: cudnn_forward(q_bshd, k_bshd, v_bshd, kind, scale),
                     lambda: fused_block_forward(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale))


def cudnn_block_backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, q_idx, k_idx, q_doc, k_doc, scale):
    """:func:`~longtrain.kernels.blocks.block_attention_backward`, chosen as the forward."""
    return _dispatch("backward", q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale,
                     lambda kind: cudnn_backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, kind, scale),
                     lambda: fused_block_backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, q_idx, k_idx,
                                                  q_doc, k_doc, scale))


register_block_kernels("cuda", cudnn_block_forward, cudnn_block_backward)
