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
exact in floating point. ``tests/test_zero.py`` compares the gradient norm and the first-step
gradients with a single process for every stage and layout, so a wrong divisor fails there.

Precision: fp32 on CPU (parameters, gradients and reductions); bf16 on GPU with fp32 master
weights, fp32 gradient accumulation and fp32 reductions (DeepSpeed's ``bf16`` mode).

Checkpoints (:func:`save_sharded`, :func:`load_sharded`). The same stage and shard count reload
DeepSpeed's own shards exactly. Another stage or shard count goes through DeepSpeed's universal
checkpoint (:func:`to_universal`): fp32 weights, Adam moments and step counts are re-sharded per
parameter, and the resumed run continues the uninterrupted one within the fp32 reordering
tolerance into every stage (``tests/test_zero.py``). DeepSpeed 0.19's ZeRO-3 universal load needs
two repairs, both in :func:`load_sharded`: it copies param group 0's hyper-parameters into every
group (weight decay on the norms), and it gives every flat group's state the same ``step`` tensor,
which AdamW's in-place increment then advances once per group and step (the loss one step after
the resume was off by ~2e-5 relative). The moments and master weights it loads are exact.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from longtrain.config import ZeroConfig
from longtrain.parallel.dims import ParallelDims

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
                     clip_grad_norm: float, load_universal: bool = False) -> Dict[str, Any]:
    """The DeepSpeed config for ``zc``, derived from longtrain's typed keys, ``zero.extra`` merged on top.

    Args:
        zc: the ``zero`` config group (stage >= 1).
        micro_batch_size: sequences per rank per forward/backward.
        grad_accum: micro-batches per optimizer step.
        dp_size: data-parallel degree (DeepSpeed's "world size" for the batch arithmetic).
        bf16: bf16 parameters with fp32 master weights, fp32 accumulation and fp32 reductions.
        clip_grad_norm: global gradient norm clip (0 disables).
        load_universal: the next ``load_checkpoint`` reads a universal checkpoint (layout change).
    """
    zero: Dict[str, Any] = {"stage": zc.stage, "reduce_scatter": True}  # one divisor per stage: grad_divisor
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


# ------------------------------------------------------------------------------------ checkpoints
ZERO_DIR, TAG = "zero", "state"
_PREFIX = "model."  # HeadModule's name for the Transformer: DeepSpeed's parameter names start with it
RESUME_MODES = {
    "same": "exact state",
    "universal": "fp32 weights, Adam moments and step counts re-sharded through DeepSpeed's universal checkpoint",
    "plain_to_zero": "fp32 weights, schedule and step kept; Adam moments restart from zero",
    "zero_to_plain": "fp32 weights, schedule and step kept; Adam moments restart from zero",
}


def save_sharded(engine, ckpt_dir: Path) -> None:
    """Every rank writes its DeepSpeed shards (model states, optimizer partitions) under
    ``ckpt_dir/zero/``; collective. The scheduler, trainer state and RNG are the trainer's."""
    engine.save_checkpoint(str(Path(ckpt_dir) / ZERO_DIR), tag=TAG, save_latest=False)


def load_sharded(engine, ckpt_dir: Path) -> None:
    """Load a :func:`save_sharded` checkpoint (or a :func:`to_universal` one when the engine was
    built with ``load_universal``) into ``engine``: weights, master weights and optimizer state."""
    # DeepSpeed's ZeRO-3 universal load copies param group 0's hyper-parameters into every group
    # (weight decay on the norms); they come from the config anyway, so put each group's back.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    keep = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in inner.param_groups]
    path, _ = engine.load_checkpoint(str(Path(ckpt_dir) / ZERO_DIR), tag=TAG, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"checkpoint.resume: DeepSpeed found no state in {Path(ckpt_dir) / ZERO_DIR}")
    for group, hyper in zip(inner.param_groups, keep):
        group.update(hyper)
    # DeepSpeed's ZeRO-3 universal load also puts ONE step tensor (the checkpoint's) into the state
    # of every flat fp32 group. torch's AdamW increments the step in place once per group, so with
    # the two groups (decay, no decay) the shared counter advanced by 2 per step and the bias
    # corrections of every later step were wrong. Give each group's state its own counter.
    seen = set()
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def to_universal(ckpt_dir: Path, out_dir: Path) -> None:
    """Convert the ZeRO shards of ``ckpt_dir`` (any stage, any shard count) into DeepSpeed's
    universal checkpoint format in ``out_dir``, which any stage and shard count can load.
    Runs on one rank; needs host memory for the largest parameter's state, not the whole model."""
    import shutil
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    src, dst = Path(ckpt_dir) / ZERO_DIR / TAG, Path(out_dir) / ZERO_DIR / TAG
    shutil.rmtree(out_dir, ignore_errors=True)
    dst.mkdir(parents=True)
    ds_to_universal(Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    # The engine looks for its own stage's model-states file name (ZeRO-3: zero_pp_rank_0_...,
    # ZeRO-1/2: mp_rank_00_...) but the converter writes the source stage's; give it both.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    present = [n for n in names if (dst / n).is_file()]
    assert present, f"no model states file in {dst}"
    for name in names:
        if not (dst / name).exists():
            shutil.copyfile(dst / present[0], dst / name)
    # Its global optimizer file has the layout of the source stage too: ZeRO-1/2 read top-level
    # param_groups, ZeRO-3 reads optimizer_state_dict.{state[0].step, param_groups}. Write both.
    optim_file = dst / "zero" / "optimizer_state.pt"
    optim = torch.load(optim_file, map_location="cpu", weights_only=False)
    inner = optim.get("optimizer_state_dict", {})
    groups = optim.get("param_groups", inner.get("param_groups"))
    step = torch.load(next((dst / "zero").glob("*/step.pt")), map_location="cpu", weights_only=False)
    optim["param_groups"] = groups
    optim["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": groups, **inner}
    torch.save(optim, optim_file)


def consolidated_fp32(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO checkpoint, unsharded offline (DeepSpeed's zero_to_fp32),
    named as the Transformer's ``state_dict()``; no process group needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt_dir) / ZERO_DIR), tag=TAG)
    return {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in state.items()}


# ---------------------------------------------------------------------------------------- memory
@dataclass
class MemoryFigures:
    """Bytes per rank, on the device and on the host, for each kind of training state."""

    params_device: float = 0.0
    params_host: float = 0.0
    grads_device: float = 0.0
    grads_host: float = 0.0
    optimizer_device: float = 0.0
    optimizer_host: float = 0.0


def expected_memory(num_params: int, stage: int, num_shards: int, bf16: bool, offload_optimizer: bool = False,
                    offload_params: bool = False) -> MemoryFigures:
    """Model-state bytes per rank by the ZeRO paper's formulas (Rajbhandari et al. 2020, section 5).

    With Psi parameters over N_d ranks: stage 0 holds ``(P + G + K) Psi``; stage 1
    ``(P + G) Psi + K Psi / N_d``; stage 2 ``P Psi + (G + K) Psi / N_d``; stage 3
    ``(P + G + K) Psi / N_d``. ``K = 12`` (fp32 master weights, Adam m and v) whenever DeepSpeed
    runs, fp32 or bf16; the plain stage-0 path keeps no master copy (``K = 8``). ``P = 2`` in bf16,
    4 in fp32; ``G = 4``: gradients accumulate in fp32 (the paper's ``2 Psi`` assumes fp16 gradients).
    The plain path (stage 0) trains fp32 parameters under bf16 autocast, so ``P = 4`` there.
    Offloaded state moves to the host column (ZeRO-Offload keeps the fp32 gradient partitions there too).
    """
    p = 2 if (bf16 and stage >= 1) else 4
    g, k = 4, (12 if stage >= 1 else 8)
    n = max(1, num_shards)
    params = num_params * p / (n if stage == 3 else 1)
    grads = num_params * g / (n if stage >= 2 else 1)
    optim = num_params * k / (n if stage >= 1 else 1)
    out = MemoryFigures()
    out.params_host, out.params_device = (params, 0.0) if offload_params else (0.0, params)
    if offload_optimizer:  # the host steps on an fp32 gradient partition; stage 1 still holds full grads
        out.optimizer_host = optim
        out.grads_host = num_params * 4 / n
        out.grads_device = num_params * p if stage == 1 else 0.0
    else:
        out.optimizer_device, out.grads_device = optim, grads
    return out


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measured_memory(model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    device: torch.device) -> MemoryFigures:
    """Parameter and optimizer-state bytes this rank holds, found by walking the tensors.

    Parameters: the local storage of each module parameter (the shard ``ds_tensor`` under ZeRO-3).
    Optimizer: the master partitions the (inner) optimizer steps when they are not the module's
    parameters, plus every tensor in its state. Gradients are not walked (DeepSpeed keeps
    them in internal buffers); the trainer measures them with the CUDA allocator. A tensor counts
    as "device" when it sits on the training ``device`` (so everything does in a CPU run).
    """
    out = MemoryFigures()
    module_ids = set()
    for p in model.parameters():  # parameters() yields a tied weight once
        module_ids.add(id(p))
        t = getattr(p, "ds_tensor", None)
        t = p if t is None else t
        if t.device.type == device.type:
            out.params_device += _bytes(t)
        else:
            out.params_host += _bytes(t)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is None:
        return out
    # Master partitions: in the param groups, or only the state's keys (ZeRO-3 empties the groups
    # between steps).
    masters = {id(p): p for group in inner.param_groups for p in group["params"]}
    masters.update({id(p): p for p in inner.state})
    tensors = [p for i, p in masters.items() if i not in module_ids]
    for state in inner.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    for t in tensors:
        if t.device.type == device.type:
            out.optimizer_device += _bytes(t)
        else:
            out.optimizer_host += _bytes(t)
    return out
