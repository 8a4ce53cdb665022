"""ZeRO sharding through the DeepSpeed engine, over the data x sequence parallel ranks.

Sequence-parallel ranks hold the same parameters but see different tokens, so for ZeRO they are
data-parallel: optimizer state (stage 1), gradients (2) and parameters (3) are partitioned over
the ``dp_sp`` group of :class:`~longtrain.parallel.dims.ParallelDims`. DeepSpeed does the
partitioning, the reduce-scatters, the offload and the sharded checkpoints; this module only
translates longtrain's layout and config into DeepSpeed's and keeps its numbers exact.

Gradient scaling (DESIGN.md, loss normalisation). Each micro-batch's loss is already
``sum_t CE_t / N_valid_global``, so the correct gradient is the plain SUM over the dp x sp ranks and
the micro-batches. DeepSpeed (0.19) instead divides the dp x sp sum by an averaging factor, and
not the same one everywhere:

- ZeRO-1/2 (``average_tensor``, ``allreduce_bucket``, ``gradient_reduction_w_predivide``) divide
  by ``seq_dp_world_size / sequence_parallel_size`` = the dp degree;
- ZeRO-3's reduce-scatter (``__avg_scatter_grads`` -> ``reduce_scatter_coalesced``) divides by the
  size of the partition group = dp x sp, while its all-reduce path for small contiguous buckets
  (only taken with ``reduce_scatter: false``) divides by dp. longtrain always sets
  ``reduce_scatter: true`` (and refuses it in ``zero.extra``) so one divisor holds for every bucket.

``engine.backward`` also divides the loss by the accumulation steps when ``scale_wrt_gas``.
longtrain back-propagates ``loss * divisor`` (:func:`grad_divisor`) with ``scale_wrt_gas=False``:
the engine's division cancels the multiplication and nothing divides by the accumulation steps,
so the reduced gradient is exactly the sum. With power-of-two degrees the multiply and divide are
exact in floating point. ``tests/distributed/test_zero.py`` compares the gradient norm and the first-step
gradients with a single process for every stage and layout, so a wrong divisor fails there.

Precision: fp32 on CPU (parameters, gradients and reductions); bf16 on GPU with fp32 master
weights, fp32 gradient accumulation and fp32 reductions (DeepSpeed's ``bf16`` mode).

Checkpoints live in :mod:`longtrain.parallel.zero_checkpoint`. :class:`ZeroEngine` is the step engine
(:mod:`longtrain.parallel.engine`) over all of it; every ``deepspeed`` import of longtrain lives in this
package.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from longtrain.config import ZeroConfig
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.distributed import barrier
from longtrain.parallel.engine import StepEngine, StepResult
from longtrain.parallel.state_memory import expected_memory, measured_memory
from longtrain.parallel.zero_checkpoint import load_sharded, save_sharded, to_universal

log = logging.getLogger(__name__)


class ZeroMPU:
    """DeepSpeed's "mpu" protocol answered from :class:`ParallelDims` (no model parallelism).

    DeepSpeed takes its data-parallel group, its sequence-parallel group and the combined group it
    shards over (``get_sequence_data_parallel_group``) from this object; they are longtrain's
    ``dp``, ``sp`` and ``dp_sp`` groups, built once by ``ParallelDims``.
    """

    def __init__(self, dims: ParallelDims) -> None:
        self.dims = dims

    def _group(self, axis: str):
        return self.dims.group(axis) or dist.group.WORLD

    def get_data_parallel_group(self):
        return self._group("dp")

    def get_data_parallel_world_size(self) -> int:
        return self.dims.size("dp")

    def get_data_parallel_rank(self) -> int:
        return self.dims.rank("dp")

    def get_sequence_parallel_group(self):
        return self._group("sp")

    def get_sequence_parallel_world_size(self) -> int:
        return self.dims.size("sp")

    def get_sequence_parallel_rank(self) -> int:
        return self.dims.rank("sp")

    def get_sequence_data_parallel_group(self):
        return self._group("dp_sp")

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dims.size("dp_sp")

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dims.rank("dp_sp")

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self):
        return None

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_group(self):
        return None


class HeadModule(nn.Module):
    """The model and an output head as one module: what the DeepSpeed engine wraps.

    ``forward(input_ids, position_ids, doc_ids, head)`` returns ``head(hidden, lm_head_weight)``
    (the chunked loss in training, passkey logits in evaluation). Under ZeRO-3 the LM head weight is
    registered as an external parameter of this module, so it is gathered for the whole forward
    even though the head uses it outside ``lm_head.forward``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                head: Callable[[torch.Tensor, torch.Tensor], Any]):
        return head(self.model.hidden_states(input_ids, position_ids=position_ids, doc_ids=doc_ids),
                    self.model.output_weight)


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(zc: ZeroConfig, micro_batch_size: int, grad_accum: int, dp_size: int, bf16: bool,
                     clip_grad_norm: float, load_universal: bool = False,
                     layer_numel: Optional[int] = None) -> Dict[str, Any]:
    """The DeepSpeed config for ``zc``, derived from longtrain's typed keys, ``zero.extra`` merged on top.

    Args:
        zc: the ``zero`` config group (stage >= 1).
        micro_batch_size: sequences per rank per forward/backward.
        grad_accum: micro-batches per optimizer step.
        dp_size: data-parallel degree (DeepSpeed's "world size" for the batch arithmetic).
        bf16: bf16 parameters with fp32 master weights, fp32 accumulation and fp32 reductions.
        clip_grad_norm: global gradient norm clip (0 disables).
        load_universal: the next ``load_checkpoint`` reads a universal checkpoint (layout change).
        layer_numel: parameters of the largest decoder layer: the buckets are sized from it (below);
            None keeps DeepSpeed's defaults.

    Buckets. DeepSpeed's defaults are absolute (reduce and all-gather buckets of 5e8 elements, 2 GB in
    fp32 whatever the model; ZeRO-3 prefetching 5e7 elements and keeping up to 1e9 gathered). Sized
    from the model instead, a bucket holds one decoder layer's parameters (their gradients reduce as
    the layer's backward ends) and ZeRO-3 keeps the current layer and the next one (prefetched)
    gathered: no memory beyond what the layer at work needs, and a step whose memory repeats layer by
    layer, which the planner extends from a few layers (longtrain/plan/depth.py).
    """
    zero: Dict[str, Any] = {"stage": zc.stage, "reduce_scatter": True}  # one divisor per stage: grad_divisor
    if layer_numel:
        zero.update(reduce_bucket_size=layer_numel, allgather_bucket_size=layer_numel)
        if zc.stage == 3:
            zero.update(stage3_prefetch_bucket_size=layer_numel, stage3_max_live_parameters=2 * layer_numel,
                        stage3_max_reuse_distance=layer_numel)
    if zc.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zc.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp_size,
        "gradient_clipping": float(clip_grad_norm),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW: longtrain's own optimizer
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return _merge(cfg, zc.extra)


def apply_zero(model: nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims,
               ds_config: Dict[str, Any]):
    """Wrap ``model`` (sequence parallelism already applied) in a DeepSpeed engine sharding over dp x sp.

    Args:
        model: the :class:`~longtrain.models.Transformer`.
        optimizer: its optimizer (``build_optimizer(..., offload=)``); the engine shards its state.
        dims: the layout, groups built; a process group must exist (one rank is fine).
        ds_config: from :func:`deepspeed_config`.

    Returns:
        ``(engine, loss_factor)``: the engine wraps a :class:`HeadModule`; back-propagate
        ``loss * loss_factor`` with ``engine.backward(..., scale_wrt_gas=False)`` to get summed
        gradients (module docstring).
    """
    import deepspeed

    assert dist.is_initialized(), "ZeRO needs a process group (init_distributed(require_group=True))"
    wrapper = HeadModule(model)
    mpu = ZeroMPU(dims)
    # DeepSpeed's communication layer over the existing torch process group (deepspeed.initialize
    # would do it, but zero.Init below runs first and needs it for the batch arithmetic).
    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    if ds_config["zero_optimization"]["stage"] == 3:
        # Partition over dp x sp ourselves: left to the engine, DeepSpeed (0.19) partitions ZeRO-3
        # parameters over mpu.get_data_parallel_group(), the dp group alone, and its gradient
        # reduce-scatter then never sums over the sequence-parallel ranks.
        if ds_config.get("bf16", {}).get("enabled"):
            # zero.Init partitions an existing module in the dtype it finds, and the engine casts
            # only unpartitioned modules to bf16 (ZeRO-1/2): without this, ZeRO-3 would train
            # bf16 runs with fp32 weights, activations and all-gathers.
            wrapper.to(torch.bfloat16)
        deepspeed.zero.Init(module=wrapper, data_parallel_group=mpu.get_sequence_data_parallel_group(),
                            config_dict_or_path=ds_config, mpu=mpu)
        deepspeed.zero.register_external_parameter(wrapper, model.output_weight)
    engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=ds_config,
                                           mpu=mpu, dist_init_required=False)
    if ds_config["zero_optimization"]["stage"] == 3:
        install_param_gather(model)
    # The engine must see longtrain's groups, or grad_divisor would compensate the wrong factor.
    assert (engine.seq_dp_world_size, engine.sequence_parallel_size) == (dims.size("dp_sp"), dims.size("sp")), \
        (engine.seq_dp_world_size, engine.sequence_parallel_size, dims.describe())
    zo = ds_config["zero_optimization"]
    log.info("zero: stage %d over dp x sp = %d ranks (%s); offload optimizer %s, params %s",
             zo["stage"], dims.size("dp_sp"), dims.describe(), zo.get("offload_optimizer", {}).get("device", "none"),
             zo.get("offload_param", {}).get("device", "none"))
    return engine, grad_divisor(ds_config["zero_optimization"]["stage"], dims)


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Undo, on leaving, what building a DeepSpeed engine changes for the whole process.

    ZeRO-3's ``zero.Init`` replaces ``torch.nn.functional.linear`` with DeepSpeed's memory-efficient
    linear (``memory_efficient_linear``, on by default: an autograd function that saves the parameter,
    not a view of its gathered storage, so released layers are not kept whole until the backward) and
    leaves it there. A training process wants that for its one engine; a process that builds one
    engine after another (the planner, one per layout) must not carry it into the next, which may
    not be ZeRO-3 (under activation checkpointing DeepSpeed's linear changes what the recomputation
    runs).
    """
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def grad_divisor(stage: int, dims: ParallelDims) -> float:
    """What DeepSpeed divides the summed gradient by at ``stage`` (module docstring): dp x sp for
    ZeRO-3's reduce-scatter, dp for ZeRO-1/2."""
    return float(dims.size("dp_sp") if stage == 3 else dims.size("dp"))


def install_param_gather(module: nn.Module) -> int:
    """ZeRO-3: give every submodule that gathers its own parameters (those with a
    ``set_param_gather(factory)`` method: StreamBP's streamed layers) the factory
    ``params -> deepspeed.zero.GatheredParameters(params)``, looked up at each call.

    Returns:
        How many submodules took it.

    Raises:
        ValueError: from a layer that cannot take a gather (StreamBP with ring attention).
    """
    import deepspeed

    def gather(params):
        return deepspeed.zero.GatheredParameters(list(params))

    takers = [m for m in module.modules() if callable(getattr(m, "set_param_gather", None))]
    for m in takers:
        m.set_param_gather(gather)
    return len(takers)


def full_fp32_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The engine's fp32 master weights, unsharded, named as ``model.state_dict()`` (CPU tensors).

    Collective: every rank must call it (ZeRO-3 shards and ZeRO-1/2 master partitions are
    gathered); every rank gets the whole dict. A tied weight appears under each of its names.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: Dict[str, torch.Tensor] = {}
    done: Dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in done:
            done[id(param)] = safe_get_full_fp32_param(param).detach().to("cpu", copy=True)
        out[name] = done[id(param)]
    return out


def cpu_adam(groups, **kwargs) -> torch.optim.Optimizer:
    """DeepSpeed's host AdamW (``DeepSpeedCPUAdam`` in AdamW mode) over ``groups``: the optimizer a
    ZeRO engine with ``zero.offload_optimizer=cpu`` steps on its host partitions."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)


class ZeroEngine(StepEngine):
    """The step engine over DeepSpeed ZeRO 1-3 (:mod:`longtrain.parallel.engine`).

    Args:
        model: the Transformer, sequence parallelism and layer wrappers applied.
        optimizer: its optimizer; DeepSpeed shards its state.
        dims: the layout, groups built.
        ds_config: from :func:`deepspeed_config`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims,
                 ds_config: Dict[str, Any]) -> None:
        self.model, self.optimizer, self.dims, self.ds_config = model, optimizer, dims, ds_config
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self.ds, self.loss_scale = apply_zero(model, optimizer, dims, ds_config)

    def train(self, mode=True):
        self.ds.train(mode)

    def forward(self, batch, head, last=True):
        if self.ds.training:
            # ZeRO-1 reduces at the boundary, 2 and 3 as gradients arrive; the engine must know
            # before the micro-batch's forward.
            self.ds.set_gradient_accumulation_boundary(last)
        return self.ds(batch["input_ids"], batch["position_ids"], batch["doc_ids"], head)

    def backward(self, loss):
        # The engine's averaging divisor (dp, or dp x sp for ZeRO-3) is cancelled by loss_scale,
        # and scale_wrt_gas=False keeps it from dividing by the accumulation steps: the gradient
        # is the plain sum (module docstring).
        self.ds.backward(loss * self.loss_scale, scale_wrt_gas=False)

    def step(self, loss):
        # DeepSpeed computes the global gradient norm inside step() and, when it is not finite,
        # skips the update (weights, Adam state) and drops the gradients. It clips to
        # optim.clip_grad_norm (the same formula as torch's), steps and zeroes the gradients.
        self.ds.step()
        return StepResult(float(self.ds.get_global_grad_norm()), bool(self.ds.was_step_applied()))

    def zero_grad(self):
        self.ds.optimizer.zero_grad(set_to_none=True)

    def save(self, ckpt_dir, is_writer):
        save_sharded(self.ds, ckpt_dir)

    def load(self, ckpt_dir, mode, work_dir=None):
        if mode == "same":
            load_sharded(self.ds, ckpt_dir)
        elif mode == "universal":  # the engine was built with checkpoint.load_universal
            ckpt_dir = Path(ckpt_dir)
            universal = Path(work_dir or ckpt_dir.parent) / f".universal-{ckpt_dir.name}"
            if dist.get_rank() == 0:
                to_universal(ckpt_dir, universal)
            barrier()
            load_sharded(self.ds, universal)
            barrier()
            if dist.get_rank() == 0:
                import shutil

                shutil.rmtree(universal, ignore_errors=True)
        elif mode != "plain_to_zero":  # plain_to_zero: the weights were loaded before the engine copied them
            raise ValueError(f"checkpoint.resume: a ZeRO engine cannot load a checkpoint in mode '{mode}'")

    def full_state_dict(self):
        return full_fp32_state_dict(self.model)

    def full_grads(self):
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).detach().clone().view(getattr(p, "ds_shape", p.shape))
                for n, p in self.model.named_parameters()}

    def buffer_tensors(self):
        # Gradients are staged in reduce buckets (reduce_bucket_size elements each): ZeRO-1/2 make
        # a list of them at the start of each backward, ZeRO-3 keeps one flat tensor per bucket
        out = []
        for bucket in (getattr(self.ds.optimizer, "ipg_buckets", None) or {}).values():
            held = getattr(bucket, "buffer", None)
            out += [held] if isinstance(held, torch.Tensor) else list(held or [])
        return out

    def memory_report(self, grads_device):
        zo = self.ds_config["zero_optimization"]
        num_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())  # ZeRO-3: full size
        bf16 = bool(self.ds_config.get("bf16", {}).get("enabled"))
        expected = expected_memory(num_params, self.zero_stage, self.dims.size("dp_sp"), bf16,
                                   "offload_optimizer" in zo, "offload_param" in zo)
        device = self.model.output_weight.device
        measured = measured_memory(self.model, self.ds.optimizer, device)
        return {"stage": self.zero_stage, "shards": self.dims.size("dp_sp"), "num_params": num_params,
                "expected": vars(expected), "measured": {**vars(measured), "grads_device": grads_device,
                                                         "grads_host": None}}

    def config_files(self):
        return {"deepspeed_config.json": json.dumps(self.ds_config, indent=1) + "\n"}
