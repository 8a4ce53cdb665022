"""ZeRO checkpoints through DeepSpeed: sharded save and load, the universal format, offline fp32.

The same stage and shard count reload DeepSpeed's own shards exactly. Another stage or shard count
goes through DeepSpeed's universal checkpoint (:func:`to_universal`): fp32 weights, Adam moments
and step counts are re-sharded per parameter, and the resumed run continues the uninterrupted one
within the fp32 reordering tolerance into every stage. DeepSpeed 0.19's ZeRO-3 universal load
needs two repairs, both in :func:`load_sharded`: it copies param group 0's hyper-parameters into
every group (weight decay on the norms), and it gives every flat group's state the same ``step``
tensor, which AdamW's in-place increment then advances once per group and step. The moments and
master weights it loads are exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from longtrain.io import load_torch

ZERO_DIR, TAG = "zero", "state"
_PREFIX = "model."  # HeadModule's name for the Transformer: DeepSpeed's parameter names start with it


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
    optim = load_torch(optim_file, state_globals())
    inner = optim.get("optimizer_state_dict", {})
    groups = optim.get("param_groups", inner.get("param_groups"))
    step = load_torch(next((dst / "zero").glob("*/step.pt")), state_globals())
    optim["param_groups"] = groups
    optim["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": groups, **inner}
    torch.save(optim, optim_file)


def state_globals() -> tuple:
    """The classes DeepSpeed's ZeRO checkpoint files hold besides tensors and plain containers: its
    loss scalers, the ZeRO stage enum and the fragment addresses of the optimizer partitions; plain
    data, which :func:`longtrain.io.load_torch` may construct (``allowed``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def consolidated_fp32(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO checkpoint, unsharded offline (DeepSpeed's zero_to_fp32),
    named as the Transformer's ``state_dict()``; no process group needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt_dir) / ZERO_DIR), tag=TAG)
    return {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in state.items()}
