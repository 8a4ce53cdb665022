"""What the trainer builds before the first step, from typed sub-configs: the model geometry, the
batch arithmetic, the precision and the initialised model; and the one builder of a run
(:func:`layout_run` then :func:`build_run`) that the trainer, the start-up check and the planner
share, a tool's stand-ins passed in as :class:`Seams`, never patched in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from longtrain.config import Config, ConfigError, ModelConfig
from longtrain.kernels.dispatch import AttentionKernels
from longtrain.memory.streambp import HostCopyFactory
from longtrain.models import ModelArgs, Transformer, args_from_hf_config, get_model_args, load_hf_weights
from longtrain.models.hf import read_hf_config
from longtrain.optim.balance import Balancer
from longtrain.optim.optimizer import build_optimizer
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.engine import StepEngine
from longtrain.parallel.parallelize import parallelize

_MODEL_OVERRIDES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "rope_theta", "rope_scaling", "max_position_embeddings", "tie_embeddings", "init_std")


def build_model_args(cfg: ModelConfig) -> ModelArgs:
    """Model geometry: the registry entry ``model.name`` with the geometry keys given in the config
    applied on top, or exactly the geometry of ``model.hf_path``'s config.json."""
    # An empty model.rope_scaling (the default) keeps the registry's scaling, like a null geometry key.
    overrides = {k: getattr(cfg, k) for k in _MODEL_OVERRIDES if getattr(cfg, k) not in (None, {})}
    moe = cfg.moe.model_args()  # ModelArgs field names equal the model.moe keys
    overrides.update(moe)
    if cfg.hf_path is None:
        return get_model_args(cfg.name, **overrides)
    if overrides:
        key = next(iter(overrides))
        raise ConfigError(f"model.{'moe.' * (key in moe)}{key}: the geometry comes from model.hf_path's config.json "
                          "and cannot be overridden (the weights would not fit); remove the override")
    return args_from_hf_config(read_hf_config(cfg.hf_path))


def resolve_batch_layout(global_batch_size: Optional[int], micro_batch_size: int, grad_accum: Optional[int],
                         dp_size: int) -> Tuple[int, int]:
    """(global batch size, accumulation steps) from the config, checked against each other.

    Raises:
        ConfigError: the three do not multiply out, naming the keys and a consistent value.
    """
    per_pass = micro_batch_size * dp_size
    if global_batch_size is None:
        return per_pass * (grad_accum or 1), grad_accum or 1
    if grad_accum is None:
        if global_batch_size % per_pass:
            raise ConfigError(f"data.global_batch_size={global_batch_size} is not a multiple of data.micro_batch_size "
                              f"({micro_batch_size}) x data-parallel degree ({dp_size}) = {per_pass}; set "
                              f"data.global_batch_size={max(1, global_batch_size // per_pass) * per_pass}")
        return global_batch_size, global_batch_size // per_pass
    if global_batch_size != per_pass * grad_accum:
        fix = f"set data.global_batch_size={per_pass * grad_accum}"
        if global_batch_size % per_pass == 0:
            fix += f" or trainer.grad_accum={global_batch_size // per_pass} (or null)"
        raise ConfigError(f"data.global_batch_size={global_batch_size} must equal data.micro_batch_size "
                          f"({micro_batch_size}) x trainer.grad_accum ({grad_accum}) x data-parallel degree "
                          f"({dp_size}) = {per_pass * grad_accum}; {fix}")
    return global_batch_size, grad_accum


def resolve_precision(precision: str, device: torch.device) -> str:
    """``trainer.precision`` with ``auto`` resolved: bf16 on CUDA, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def build_model(args: ModelArgs, hf_path: Optional[str], seed: int, device: torch.device,
                init_from: Optional[str] = None) -> Transformer:
    """The Transformer of ``args`` on ``device``: random weights drawn from ``seed`` (the same on
    every rank), then ``hf_path``'s weights, or those of the longtrain checkpoint ``init_from``, when given.

    The weights are made on ``device`` itself (drawn by its generator), so a GPU run neither builds the
    model in host memory first nor waits for a CPU initialisation of billions of weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
        model.init_weights()
    if hf_path is not None:
        load_hf_weights(model, hf_path)
    if init_from is not None:
        from longtrain.trainer.init_from import check_geometry, find_checkpoint, load_weights

        checkpoint = find_checkpoint(init_from, "model.init_from")
        check_geometry(checkpoint, args, "model.init_from")
        load_weights(model, checkpoint)
    return model.to(device)


# ---------------------------------------------------------------------------- one builder
@dataclass
class RunLayout:
    """What a run is, checked before any tensor exists: the start-up check stops here."""

    dims: ParallelDims
    """The degrees and every process group."""
    args: ModelArgs
    global_batch_size: int
    grad_accum: int
    precision: str
    """``trainer.precision`` resolved for the device: ``bf16`` or ``fp32``."""

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"


def layout_run(cfg: Config, world_size: int, device: torch.device, build_groups: bool = True) -> RunLayout:
    """The layout of ``cfg`` on ``world_size`` ranks of ``device``, in the order every tool checks it:
    degrees against the world and the sequence, the geometry, the heads against the layout, the process
    groups (every rank, once; not for a check that only validates), the batch.

    Raises:
        ValueError / ConfigError: the first problem, naming the key and the fix.
    """
    sp = cfg.parallel.sp
    dims = ParallelDims(world_size=world_size, ulysses=sp.ulysses, ring=sp.ring)
    dims.validate_seq_len(cfg.data.seq_len)
    args = build_model_args(cfg.model)
    dims.validate_model(args.num_heads, args.num_kv_heads)
    if build_groups:
        dims.build_groups()
    global_batch, grad_accum = resolve_batch_layout(cfg.data.global_batch_size, cfg.data.micro_batch_size,
                                                    cfg.trainer.grad_accum, dims.size("dp"))
    return RunLayout(dims, args, global_batch, grad_accum, resolve_precision(cfg.trainer.precision, device))


@dataclass
class Seams:
    """What a tool that runs the step differently hands the builder (the planner); the defaults are
    training's."""

    kernels: Optional[AttentionKernels] = None
    """The attention kernels (None: ``trainer.attention_backend``'s)."""
    host_copy: Optional[HostCopyFactory] = None
    """What parks an offloaded StreamBP layer input (None: pinned host memory)."""
    host_optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None
    """ZeRO-Offload's host optimizer (None: DeepSpeed's CPU AdamW)."""
    optimizer_device: Optional[torch.device] = None
    """The device the optimizer is built for (None: the run's; fused AdamW on CUDA)."""
    load_weights: bool = True
    """Load ``model.hf_path`` / ``model.init_from`` (a plan needs no values)."""


@dataclass
class Run:
    """A built run: the loop drives ``engine`` (and ``balancer`` for MoE) only."""

    layout: RunLayout
    model: Transformer
    optimizer: torch.optim.Optimizer
    engine: StepEngine
    balancer: Optional[Balancer]


def build_run(cfg: Config, layout: RunLayout, device: torch.device, seams: Optional[Seams] = None,
              before_engine: Optional[Callable[[Transformer, torch.optim.Optimizer], None]] = None,
              load_universal: bool = False) -> Run:
    """Model, optimizer, :func:`~longtrain.parallel.parallelize.parallelize` and the MoE balancer, as
    the trainer, its start-up and the planner all build a run.

    Args:
        cfg: the validated config.
        layout: :func:`layout_run`'s answer, groups built.
        device: the training device.
        seams: a tool's stand-ins (:class:`Seams`); None: training's.
        before_engine: called with the model and optimizer before the engine wraps them (the
            trainer's schedule and the checkpoint weights a resume loads first).
        load_universal: the ZeRO engine will load a universal checkpoint.
    """
    seams = seams or Seams()
    dims, args = layout.dims, layout.args
    model = build_model(args, cfg.model.hf_path if seams.load_weights else None, cfg.trainer.seed, device,
                        cfg.model.init_from if seams.load_weights else None)
    optimizer = build_optimizer(model, cfg.optim, seams.optimizer_device or device,
                                offload=cfg.zero.offload_optimizer == "cpu", host_optimizer=seams.host_optimizer)
    if before_engine is not None:
        before_engine(model, optimizer)
    engine = parallelize(model, dims, cfg, optimizer, grad_accum=layout.grad_accum, device=device, bf16=layout.bf16,
                         load_universal=load_universal, kernels=seams.kernels, host_copy=seams.host_copy)
    engine.train(True)
    balancer = None
    if args.moe_layers:
        balancer = Balancer(model, cfg.moe, dims, cfg.data.micro_batch_size, layout.grad_accum, cfg.data.seq_len,
                            loss_scale=engine.loss_scale)
    return Run(layout, model, optimizer, engine, balancer)
