"""The one dispatch point of attention kernels: every caller (ring blocks, StreamBP chunks, Ulysses,
local attention) asks an :class:`AttentionKernels`, which picks one executor per block.

A block is the attention of a set of queries over a set of keys, each token carrying its global
index and document id (the contract of :mod:`longtrain.kernels.blocks`). For each block the
dispatch picks, in this order:

1. ``cudnn``: SDPA's cuDNN ops (:mod:`longtrain.kernels.cudnn`), for a dense block (one document,
   causal-square or fully visible) of half-precision CUDA tensors, when the backend is ``cudnn``, or
   ``auto`` and a timing probe on the first block of its shape class found cuDNN faster;
2. ``flash``: flash attention's varlen ops (:mod:`longtrain.kernels.fused`) for half-precision CUDA
   tensors whose block has a segment plan (every layout longtrain makes);
3. ``cpu``: the CPU flash op, one call per segment, for fp32/fp64 CPU tensors with a segment plan;
4. the reference kernels (:mod:`longtrain.kernels.blocks`): ``reference`` where no fused executor
   takes the inputs (fp32 on CUDA, odd head sizes), ``fallback`` where one takes the dtype but the
   block has no segment plan. A GPU run counts the latter as a defect (``bench/fallback_guard.py``).

The backend (``auto``, ``flash``, ``cudnn``) is chosen once, by the builder from
``trainer.attention_backend``, and handed to every attention function it makes; nothing registers
kernels at import. cuDNN is used only after an availability probe per device (a small causal and
full block through cuDNN and flash, forward and backward, must agree at a bf16 tolerance); a
failing probe, or a cuDNN call that raises (other than out of memory), turns cuDNN off for that
device and says why in :data:`KERNEL_STATS`.

``cuda_device_types``: device types whose tensors take CUDA's executors; the planner adds the
device of its fake tensors, which have CUDA's shape functions but no kernels.

Layout legend: as :mod:`longtrain.kernels.blocks`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import torch

from longtrain.kernels import cudnn, fused
from longtrain.kernels.blocks import check_docs, check_shapes, reference_block_backward, reference_block_forward

BACKENDS = ("auto", "flash", "cudnn")
HALF = (torch.float16, torch.bfloat16)
PATHS = ("cudnn", "flash", "cpu", "reference", "fallback")


@dataclass
class KernelStats:
    """Every block call of every :class:`AttentionKernels` in this process, by executor (forward
    and backward counted apart), with the cuDNN decisions."""

    calls: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    """Calls per path of the module docstring."""
    choices: Dict[tuple, dict] = field(default_factory=dict)
    """``auto``'s choices: shape class -> {"backend", "ms" per backend}."""
    available: Dict[str, bool] = field(default_factory=dict)
    """cuDNN's availability probe per device."""
    disabled: Dict[str, str] = field(default_factory=dict)
    """Per device, why cuDNN was turned off."""

    @property
    def fused(self) -> int:
        return self.calls["cudnn"] + self.calls["flash"] + self.calls["cpu"]

    def reset(self) -> None:
        self.calls = dict.fromkeys(PATHS, 0)
        self.choices.clear()
        self.available.clear()
        self.disabled.clear()


KERNEL_STATS = KernelStats()


class Route(NamedTuple):
    """How one block runs: the path, the dense kind for cuDNN, the segments for flash/cpu."""

    path: str
    kind: Optional[str] = None
    segments: Optional[fused.Segments] = None


class AttentionKernels:
    """The attention kernels of one run (module docstring).

    Args:
        backend: ``auto``, ``flash`` or ``cudnn``.
        cuda_device_types: device types whose tensors take CUDA's executors.
        cuda_dtypes: the dtypes CUDA's executors take (half precision; tests may widen it to run the
            executors' plumbing on stand-in ops).
    """

    def __init__(self, backend: str = "auto", cuda_device_types: Iterable[str] = ("cuda",),
                 cuda_dtypes: Iterable[torch.dtype] = HALF) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"trainer.attention_backend: choose one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.cuda_device_types = frozenset(cuda_device_types)
        self.cuda_dtypes = tuple(cuda_dtypes)

    def __repr__(self) -> str:
        extra = "" if self.cuda_device_types == {"cuda"} else f", cuda_device_types={sorted(self.cuda_device_types)}"
        return f"AttentionKernels({self.backend!r}{extra})"

    # ------------------------------------------------------------------ which executor
    def takes_cuda(self, q_bshd: torch.Tensor) -> bool:
        """Whether CUDA's executors (flash varlen, cuDNN) take these queries: device, dtype, head size."""
        if not (q_bshd.device.type in self.cuda_device_types and q_bshd.dtype in self.cuda_dtypes
                and q_bshd.shape[-1] % 8 == 0 and q_bshd.shape[-1] <= 256):
            return False
        return not q_bshd.is_cuda or torch.backends.cuda.is_flash_attention_available()

    def route(self, q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale: float) -> Route:
        """The executor of one block (module docstring); checks the shapes."""
        check_shapes(q_bshd, k_bshd, v_bshd, q_idx, k_idx)
        check_docs(q_doc, k_doc)
        if self.takes_cuda(q_bshd):
            kind = None if self.backend == "flash" else cudnn.dense_kind(q_idx, k_idx, q_doc, k_doc)
            if kind is not None and self._use_cudnn(q_bshd, k_bshd, v_bshd, kind, scale):
                return Route("cudnn", kind)
            path = "flash"
        elif q_bshd.device.type == "cpu" and q_bshd.dtype in (torch.float32, torch.float64):
            path = "cpu"
        else:
            return Route("reference")
        seg = fused.plan_segments(q_idx, k_idx, q_doc, k_doc, q_bshd.shape[0])
        return Route("fallback") if seg is None else Route(path, segments=seg)

    def _use_cudnn(self, q_bshd, k_bshd, v_bshd, kind: str, scale: float) -> bool:
        if q_bshd.shape[-1] > 128 or not self._cudnn_available(q_bshd.device):
            return False
        if self.backend == "cudnn":
            return True
        key = cudnn.shape_class(q_bshd, k_bshd, kind)
        if key not in KERNEL_STATS.choices:
            try:
                with torch.no_grad():
                    plain = tuple(t.detach() for t in (q_bshd, k_bshd, v_bshd))
                    ms = {"cudnn": cudnn.measure_ms(self._cudnn_pair, *plain, kind, scale),
                          "flash": cudnn.measure_ms(self._flash_pair, *plain, kind, scale)}
                KERNEL_STATS.choices[key] = dict(backend=min(ms, key=ms.get), ms=ms)
            except Exception as exc:  # noqa: BLE001 - any failure of the probe means: not cuDNN
                self._disable(q_bshd.device, f"timing probe: {type(exc).__name__}: {_first_line(exc)}")
                return False
        return KERNEL_STATS.choices[key]["backend"] == "cudnn"

    # ------------------------------------------------------------------ cuDNN availability
    @staticmethod
    def _disable(device: torch.device, why: str) -> None:
        KERNEL_STATS.available[str(device)] = False
        KERNEL_STATS.disabled[str(device)] = why

    @staticmethod
    def _cudnn_pair(q, k, v, dout, kind, scale):
        out, lse = cudnn.cudnn_forward(q, k, v, kind, scale)
        return (out, lse, *cudnn.cudnn_backward(dout, q, k, v, out, lse, kind, scale))

    @staticmethod
    def _flash_pair(q, k, v, dout, kind, scale):
        idx = torch.arange(q.shape[1], device=q.device)
        q_idx = idx + (k.shape[1] if kind == "full" else 0)
        k_idx = torch.arange(k.shape[1], device=q.device)
        seg = fused.plan_segments(q_idx, k_idx, None, None, q.shape[0])
        out, lse = fused.varlen_forward(q, k, v, seg, scale)
        return (out, lse, *fused.varlen_backward(dout, q, k, v, out, lse, seg, scale))

    def _cudnn_available(self, device: torch.device) -> bool:
        """Probe once per device: cuDNN and flash must agree on a small causal and full block."""
        key = str(device)
        if key not in KERNEL_STATS.available:
            if device.type == "cuda" and not torch.backends.cudnn.is_available():
                self._disable(device, "torch.backends.cudnn is not available")
                return False
            try:
                gen = torch.Generator().manual_seed(0)
                dtype = self.cuda_dtypes[-1]
                q, dout = (torch.randn(1, 256, 4, 64, generator=gen).to(device, dtype) for _ in range(2))
                k, v = (torch.randn(1, 256, 2, 64, generator=gen).to(device, dtype) for _ in range(2))
                for kind in ("causal", "full"):
                    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"),
                                               self._cudnn_pair(q, k, v, dout, kind, 0.125),
                                               self._flash_pair(q, k, v, dout, kind, 0.125)):
                        err = (got.float() - want.float()).abs().max().item()
                        if not err <= 3e-2 * (want.float().abs().max().item() + 1.0):
                            raise RuntimeError(f"{kind} {name} differs from flash by {err:.3g}")
                KERNEL_STATS.available[key] = True
            except Exception as exc:  # noqa: BLE001 - no cuDNN attention on this build/GPU, or a wrong answer
                self._disable(device, f"probe: {type(exc).__name__}: {_first_line(exc)}")
        return KERNEL_STATS.available[key]

    # ------------------------------------------------------------------ the block kernels
    def forward(self, q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale: float,
                route: Optional[Route] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Masked attention of the queries over one key block, with the per-row log-sum-exp.

        Args:
            q_bshd: [B, Sq, Hq, D] queries; k_bshd, v_bshd: [B, Sk, Hkv, D], ``Hq = g * Hkv``.
            q_idx, k_idx: [Sq] / [Sk] int64 global token indices (key j visible to query i iff
                ``k_idx[j] <= q_idx[i]`` and their documents agree).
            q_doc, k_doc: [B, Sq] / [B, Sk] document ids, or both None (one document).
            scale: softmax scale.
            route: :meth:`route`'s answer for this block (None: routed here).

        Returns:
            ``(out_bshd, lse_bhs)``: ``out`` in q's dtype, ``lse`` [B, Hq, Sq] fp32 (fp64 for fp64
            inputs); rows with no visible key get ``out = 0``, ``lse = -inf``.
        """
        route = route or self.route(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale)
        if route.path == "cudnn":
            try:
                res = cudnn.cudnn_forward(q_bshd, k_bshd, v_bshd, route.kind, scale)
                KERNEL_STATS.calls["cudnn"] += 1
                return res
            except RuntimeError as exc:
                self._cudnn_failed(q_bshd.device, "forward", exc)
                return self.forward(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale)
        KERNEL_STATS.calls[route.path] += 1
        if route.segments is None:
            return reference_block_forward(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale)
        run = fused.varlen_forward if route.path == "flash" else fused.loop_forward
        return run(q_bshd.contiguous(), k_bshd.contiguous(), v_bshd.contiguous(), route.segments, scale)

    def backward(self, dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, q_idx, k_idx, q_doc, k_doc,
                 scale: float, route: Optional[Route] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This block's share of the attention gradients from the *merged* output and lse (summed
        over every key block: the exact gradients; FlashAttention-2's backward). Arguments as
        :meth:`forward`, plus ``dout_bshd`` (gradient of the merged output), ``out_bshd`` and
        ``lse_bhs`` (merged over every block). Returns (dq, dk, dv) in the dtypes of q, k, v."""
        route = route or self.route(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale)
        if route.path == "cudnn":
            try:
                res = cudnn.cudnn_backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, route.kind, scale)
                KERNEL_STATS.calls["cudnn"] += 1
                return res
            except RuntimeError as exc:
                self._cudnn_failed(q_bshd.device, "backward", exc)
                return self.backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, q_idx, k_idx, q_doc,
                                     k_doc, scale)
        KERNEL_STATS.calls[route.path] += 1
        if route.segments is None:
            return reference_block_backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, q_idx, k_idx,
                                            q_doc, k_doc, scale)
        run = fused.varlen_backward if route.path == "flash" else fused.loop_backward
        tensors = (t.contiguous() for t in (dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd.to(q_bshd.dtype)))
        return run(*tensors, lse_bhs, route.segments, scale)

    def _cudnn_failed(self, device: torch.device, what: str, exc: RuntimeError) -> None:
        if isinstance(exc, torch.OutOfMemoryError):
            raise exc
        self._disable(device, f"{what}: {_first_line(exc)}")

    # ------------------------------------------------------------------ differentiable attention
    def attention(self, q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale: float) -> torch.Tensor:
        """Differentiable attention of one block (arguments as :meth:`forward`): one route for its
        forward and backward."""
        return _BlockAttention.apply(self, q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale)

    def whole_sequence(self, q_bshd, k_bshd, v_bshd, doc_ids: Optional[torch.Tensor],
                       scale: Optional[float]) -> Optional[torch.Tensor]:
        """Causal, document-masked attention of a whole sequence as one block on CUDA's executors (all
        documents of all rows in one varlen call; a single document may go to cuDNN), or None where
        these inputs take none (the caller then runs SDPA)."""
        if not self.takes_cuda(q_bshd):
            return None
        scale = 1.0 / math.sqrt(q_bshd.shape[-1]) if scale is None else scale
        idx = torch.arange(q_bshd.shape[1], device=q_bshd.device)
        return self.attention(q_bshd, k_bshd, v_bshd, idx, idx, doc_ids, doc_ids, scale)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale):
        route = kernels.route(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale)
        out_bshd, lse_bhs = kernels.forward(q_bshd, k_bshd, v_bshd, q_idx, k_idx, q_doc, k_doc, scale, route)
        ctx.save_for_backward(q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, q_idx, k_idx, q_doc, k_doc)
        ctx.kernels, ctx.route, ctx.scale = kernels, route, scale
        return out_bshd

    @staticmethod
    def backward(ctx, dout_bshd):
        q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, q_idx, k_idx, q_doc, k_doc = ctx.saved_tensors
        grads = ctx.kernels.backward(dout_bshd, q_bshd, k_bshd, v_bshd, out_bshd, lse_bhs, q_idx, k_idx, q_doc,
                                     k_doc, ctx.scale, ctx.route)
        return (None, *grads, None, None, None, None, None)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:200] if text else ""


DEFAULT_KERNELS = AttentionKernels()
"""The kernels of attention functions built without a run (a model made outside the trainer): ``auto``."""

__all__ = ["AttentionKernels", "BACKENDS", "DEFAULT_KERNELS", "KERNEL_STATS", "KernelStats", "Route"]
