"""Apply parallelism and memory features to a model: one place, one written order.

:func:`parallelize` is the only caller of the ``apply_*`` functions, and the order matters:

1. **Sequence-parallel attention** (:func:`apply_sequence_parallel`): every layer's attention
   function becomes Ulysses, ring or their hybrid over ``dims`` (local attention at sp=1), all on
   the run's one :class:`~longtrain.kernels.dispatch.AttentionKernels` (``trainer.attention_backend``).
   It comes first because the layer wrappers ask the attention function how a chunk of queries gets
   its keys.
2. **Layer wrappers** (:mod:`longtrain.memory`): StreamBP (``memory.streambp``) or activation
   checkpointing (``memory.checkpointing``) replace each decoder layer with a wrapped one, as
   torchtitan's ``apply_ac`` does. StreamBP wins when both are set.
3. **The step engine** (:mod:`longtrain.parallel.engine`): ZeRO through DeepSpeed
   (``zero.stage`` >= 1, sharding over dp x sp; it installs its ZeRO-3 gather on the wrappers) or
   the plain torch engine. It comes last so it sees the final module structure.

Each step logs one line saying what it did.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from torch import nn

from longtrain.config import Config
from longtrain.memory import apply_checkpointing, apply_streambp, auto_chunk_size
from longtrain.memory.streambp import HostCopyFactory
from longtrain.kernels.attention import LocalAttention
from longtrain.kernels.dispatch import DEFAULT_KERNELS, AttentionKernels
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.engine import PlainEngine, StepEngine

log = logging.getLogger(__name__)


def resolve_ulysses_chunks(chunks: int, group) -> int:
    """``parallel.sp.ulysses_chunks``, with 0 (auto) resolved: 2 where collectives run asynchronously
    to compute (nccl), else 1."""
    if chunks > 0:
        return chunks
    import torch.distributed as dist

    return 2 if dist.is_initialized() and dist.get_backend(group) == "nccl" else 1


def build_sp_attention(dims: ParallelDims, ulysses_chunks: int = 0,
                       kernels: AttentionKernels = DEFAULT_KERNELS):
    """The attention function for ``dims``' sequence-parallel layout.

    - ulysses only: all-to-all to the full sequence of H/U heads, local attention, all-to-all back;
    - ring only: zigzag ring attention over the ring group;
    - hybrid: Ulysses outside, ring inside (each ring rank's Ulysses-level sequence is its zigzag
      pair of chunks, see :func:`longtrain.parallel.sharding.shard_sequence`).

    Args:
        dims: the layout, with groups built.
        ulysses_chunks: head chunks pipelined through the Ulysses all-to-alls (0: auto, see
            :func:`resolve_ulysses_chunks`).
        kernels: the attention kernels every block runs on.
    """
    inner = LocalAttention(kernels)
    if dims.sp == 1:
        return inner
    if dims.ring > 1:
        from longtrain.parallel.ring import RingAttention

        inner = RingAttention(dims.group("ring"), kernels=kernels)
    if dims.ulysses == 1:
        return inner
    from longtrain.parallel.ulysses import UlyssesAttention

    group = dims.group("ulysses")
    return UlyssesAttention(group, inner=inner, chunks=resolve_ulysses_chunks(ulysses_chunks, group))


def apply_sequence_parallel(model: nn.Module, dims: ParallelDims, ulysses_chunks: int = 0,
                            kernels: AttentionKernels = DEFAULT_KERNELS) -> None:
    """Make every attention layer of ``model`` sequence-parallel over ``dims`` (local attention at
    sp=1), on ``kernels``."""
    attn = build_sp_attention(dims, ulysses_chunks, kernels)
    model.set_attention_fn(attn)
    if dims.sp == 1:
        log.info("sequence parallel: none (sp=1), local attention on every layer, kernels %r", kernels)
        return
    log.info("sequence parallel: ulysses=%d x ring=%d on every attention layer (%r), kernels %r", dims.ulysses,
             dims.ring, attn, kernels)


def sp_comm_stats() -> Tuple[int, float]:
    """(bytes sent, seconds of communication not hidden behind compute) for sequence parallelism on
    this rank so far: ring K/V hops (time waiting on them) and Ulysses all-to-alls (all their time),
    forward and backward. The trainer reports the difference per step."""
    from longtrain.parallel.ring import RING_STATS
    from longtrain.parallel.ulysses import ULYSSES_STATS

    return (RING_STATS.fwd_bytes_sent + RING_STATS.bwd_bytes_sent + ULYSSES_STATS.bytes_sent,
            RING_STATS.wait_s + ULYSSES_STATS.comm_s)


def apply_layer_wrappers(model: nn.Module, streambp: bool, chunk_size, offload: bool, checkpointing: bool,
                         seq_len_local: int, micro_batch_size: int, elem_bytes: int, device: torch.device,
                         host_copy: Optional[HostCopyFactory] = None) -> None:
    """Step 2: StreamBP (``chunk_size`` tokens; ``auto`` from the model geometry and free device
    memory; ``offload`` parks each layer's input with ``host_copy``, default pinned host memory) or,
    when StreamBP is off, activation checkpointing on every decoder layer; nothing when neither is
    asked. Each wrapper logs its own line."""
    if streambp:
        if chunk_size == "auto":
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            chunk_size = auto_chunk_size(model.args, seq_len_local, micro_batch_size, free, elem_bytes=elem_bytes)
        apply_streambp(model, chunk_size, offload, **({} if host_copy is None else {"host_copy": host_copy}))
    elif checkpointing:
        apply_checkpointing(model)
    else:
        log.info("layer wrappers: none (memory.checkpointing and memory.streambp.enabled are off)")


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims, cfg: Config, bf16: bool,
                 autocast_dtype: Optional[torch.dtype], grad_accum: int, load_universal: bool = False) -> StepEngine:
    """Step 3: the ZeRO engine for ``zero.stage`` >= 1 (DeepSpeed config derived from the typed keys),
    else the plain engine summing gradients over dp x sp."""
    if cfg.zero.stage > 0:
        from longtrain.parallel import zero

        layer_numel = max(sum(p.numel() for p in layer.parameters()) for layer in model.layers)
        ds_config = zero.deepspeed_config(cfg.zero, cfg.data.micro_batch_size, grad_accum, dims.size("dp"),
                                          bf16=bf16, clip_grad_norm=cfg.optim.clip_grad_norm,
                                          load_universal=load_universal, layer_numel=layer_numel)
        return zero.ZeroEngine(model, optimizer, dims, ds_config)  # logs its own line
    engine = PlainEngine(model, optimizer, dims.group("dp_sp"), cfg.optim.clip_grad_norm, autocast_dtype)
    model.fp32_residual = cfg.trainer.fp32_residual
    log.info("step engine: plain torch, gradients summed over dp x sp = %d ranks%s", dims.size("dp_sp"),
             f", autocast {autocast_dtype} (residual stream in "
             f"{'fp32' if model.fp32_residual else autocast_dtype})" if autocast_dtype is not None else "")
    return engine


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Config, optimizer: torch.optim.Optimizer, *,
                grad_accum: int, device: torch.device, bf16: bool, load_universal: bool = False,
                kernels: Optional[AttentionKernels] = None, host_copy: Optional[HostCopyFactory] = None
                ) -> StepEngine:
    """Apply sequence parallelism, the layer wrappers and the step engine to ``model``, in that order
    (module docstring), and return the engine the training loop drives.

    Args:
        model: the Transformer on ``device``, weights initialised or loaded.
        dims: the layout, groups built.
        cfg: the typed config (``parallel``, ``memory``, ``zero``, ``data``, ``optim`` are read).
        optimizer: the model's optimizer (built over the same parameter objects the wrappers keep).
        grad_accum: micro-batches per optimizer step (resolved from the batch keys).
        device: the training device.
        bf16: train in bf16 (autocast on the plain engine, DeepSpeed's bf16 mode under ZeRO).
        load_universal: the ZeRO engine will load a universal checkpoint (a resumed layout change).
        kernels: the attention kernels (None: ``trainer.attention_backend``'s, on CUDA devices); the
            planner passes its own, which run CUDA's executors on its fake tensors.
        host_copy: what parks an offloaded StreamBP layer input (None: pinned host memory); the
            planner passes one that counts it as host memory.
    """
    sp, mc = cfg.parallel.sp, cfg.memory
    kernels = AttentionKernels(cfg.trainer.attention_backend) if kernels is None else kernels
    apply_sequence_parallel(model, dims, sp.ulysses_chunks, kernels)
    apply_layer_wrappers(model, mc.streambp.enabled, mc.streambp.chunk_size, mc.offload_checkpoints, mc.checkpointing,
                         cfg.data.seq_len // dims.sp, cfg.data.micro_batch_size, 2 if bf16 else 4, device, host_copy)
    autocast_dtype = torch.bfloat16 if bf16 and cfg.zero.stage == 0 else None  # DeepSpeed's bf16 holds bf16 params
    return build_engine(model, optimizer, dims, cfg, bf16, autocast_dtype, grad_accum, load_universal)
