"""Checkpoints of a run: save, the resume plan (which checkpoint, how to load it), its application,
and the Hugging Face export.

Resuming is split in two. :func:`plan_resume` only reads: it picks the checkpoint
(``checkpoint.resume``), checks that it holds the same model, global batch, sequence length and
seed, and chooses how the step engine loads it (a mode of
:data:`longtrain.parallel.engine.RESUME_MODES`: ``same``, ``universal`` for another ZeRO stage or
shard count, ``plain_to_zero``, ``zero_to_plain``). :class:`CheckpointMixin` applies it once the
engine exists: the engine loads weights and optimizer state (converting a ZeRO checkpoint to
DeepSpeed's universal format first when the plan says so), the trainer the schedule, MoE routing
bias, counters and RNG streams. ``plain_to_zero`` weights go into the model before the engine copies
them (:func:`load_before_engine`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from longtrain.config import ConfigError
from longtrain.models import Transformer
from longtrain.parallel.distributed import barrier
from longtrain.parallel.engine import RESUME_MODES
from longtrain.io import load_model, load_rng_state, load_torch, rng_state, save_torch, set_rng_state
from longtrain.trainer import state_files
from longtrain.trainer.checkpoint import CheckpointManager

log = logging.getLogger("longtrain")

_KEY_NAMES = {"global_batch_size": "data.global_batch_size", "seq_len": "data.seq_len", "seed": "trainer.seed"}


@dataclass(frozen=True)
class ResumePlan:
    """The checkpoint to resume from and how the engine loads it."""

    path: Path
    mode: str
    """A key of :data:`~longtrain.parallel.engine.RESUME_MODES`."""
    saved_stage: int
    saved_shards: int


def plan_resume(ckpt: CheckpointManager, spec: str, run_dir: Path, expected: Dict[str, Any], stage: int,
                shards: int) -> Optional[ResumePlan]:
    """Which checkpoint ``checkpoint.resume=spec`` continues, and how; None for a fresh start.
    Reads only (collective: the ranks share the hashing of the chosen checkpoint).

    Args:
        ckpt: the run's checkpoint manager.
        spec: ``auto``, ``none``, ``latest`` or a checkpoint path.
        run_dir: the run directory (for the message when ``none`` meets existing checkpoints).
        expected: what the checkpoint must match: ``model_args`` (as ``asdict``), ``global_batch_size``,
            ``seq_len``, ``seed``.
        stage, shards: this run's ZeRO stage and the number of ranks it shards over (dp x sp).

    Raises:
        ConfigError: the checkpoint holds another model, batch size, sequence length or seed, or
            a state file that would run code when loaded (:mod:`longtrain.trainer.state_files`),
            or ``none`` was asked over existing checkpoints.
    """
    if spec == "none":
        existing = ckpt.latest_in()
        if existing is not None:
            raise ConfigError(f"checkpoint.resume: run.dir '{run_dir}' already holds checkpoint {existing}; "
                              "pass checkpoint.resume=auto to continue it or choose another run.dir")
        return None
    path = ckpt.resolve_resume(spec, check_hashes=True)  # a corrupted newest one falls back
    if path is None:
        return None
    refused = ckpt.check_shared(state_files.pickles(path), lambda mine: state_files.unsafe(path, mine))
    if refused:  # a file that would run code when unpickled: refused, not skipped
        raise state_files.refusal("checkpoint.resume", refused)
    state = json.loads((path / "trainer_state.json").read_text())
    mine = json.loads(json.dumps(expected["model_args"]))  # as stored: tuples become lists
    if state["model_args"] != mine:
        saved_args = state["model_args"]
        diff = sorted(k for k in set(saved_args) | set(mine) if saved_args.get(k) != mine.get(k))
        values = ", ".join(f"{k} {saved_args.get(k)!r} vs {mine.get(k)!r}" for k in diff[:4])
        fresh = ("in another run.dir" if Path(path).resolve().is_relative_to(Path(run_dir).resolve())
                 else "with checkpoint.resume=none or another run.dir")
        raise ConfigError(f"checkpoint.resume: {path} holds a different model (differs in {', '.join(diff)}: "
                          f"checkpoint vs this run {values}); resume with the same model.* settings or start "
                          f"fresh {fresh}")
    for key, name in _KEY_NAMES.items():
        if state[key] != expected[key]:
            raise ConfigError(f"{name}: the checkpoint {path} was trained with {name}={state[key]} but this run "
                              f"uses {expected[key]}; the data order would change. Set {name}={state[key]}")
    saved = state.get("zero", {"stage": 0, "shards": state["world_size"]})
    if (saved["stage"] > 0) != (stage > 0):
        mode = "plain_to_zero" if stage > 0 else "zero_to_plain"
    elif stage > 0 and (saved["stage"], saved["shards"]) != (stage, shards):
        mode = "universal"
    else:
        mode = "same"
    return ResumePlan(path, mode, saved["stage"], saved["shards"])


def load_before_engine(plan: Optional[ResumePlan], model: torch.nn.Module) -> None:
    """A plain checkpoint resumed under ZeRO: its weights go into the model before the engine
    copies them into its (sharded) master weights."""
    if plan is not None and plan.mode == "plain_to_zero":
        load_model(model, plan.path / "model.safetensors")


class CheckpointMixin:
    """Checkpoint save, resume application and HF export of :class:`~longtrain.trainer.loop.Trainer`."""

    def _state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "global_batch_size": self.global_batch_size,
                "seq_len": self.cfg.data.seq_len, "seed": self.cfg.trainer.seed, "world_size": self.dist.world_size,
                "skipped_in_a_row": self.skipped_in_a_row,
                "model_args": asdict(self.model_args),
                "zero": {"stage": self.engine.zero_stage, "shards": self.dims.size("dp_sp"),
                         "layout": self.dims.describe()}}

    def _expected(self) -> Dict[str, Any]:
        """What a checkpoint must match to be resumed by this run (:func:`plan_resume`)."""
        return {"model_args": asdict(self.model_args), "global_batch_size": self.global_batch_size,
                "seq_len": self.cfg.data.seq_len, "seed": self.cfg.trainer.seed}

    def save_checkpoint(self) -> Path:
        """Save everything an exact resume needs; every rank saves its own RNG state (and, under
        ZeRO, its DeepSpeed shards under ``zero/``)."""
        def write(tmp: Path) -> None:
            self.engine.save(tmp, self.dist.is_writer)
            if self.dist.is_writer:
                save_torch(self.scheduler.state_dict(), tmp / "scheduler.pt")
                if self.balancer is not None and self.balancer.state_dict():
                    save_torch(self.balancer.state_dict(), tmp / "moe_balance.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(self._state(), indent=1))
            (tmp / "rng").mkdir(parents=True, exist_ok=True)
            save_torch(rng_state(), tmp / "rng" / f"rank_{self.dist.rank:05d}.pt")

        path = self.ckpt.save(self.step, write, meta={"step": self.step, "zero_stage": self.engine.zero_stage})
        self._info(f"saved checkpoint {path}")
        return path

    def _resume(self, plan: Optional[ResumePlan]) -> None:
        """Apply ``plan`` (:func:`plan_resume`) to the built engine, schedule, balancer and counters."""
        if plan is None:
            return
        path, stage, shards = plan.path, self.engine.zero_stage, self.dims.size("dp_sp")
        if plan.mode != "same":
            self._info(f"resuming {path} (zero stage {plan.saved_stage} on {plan.saved_shards} ranks) as zero stage "
                       f"{stage} on {shards} ranks: {RESUME_MODES[plan.mode]}")
        self.engine.load(path, plan.mode, work_dir=self.run_dir / "checkpoints")
        self.scheduler.load_state_dict(load_torch(path / "scheduler.pt"))
        if self.balancer is not None and (path / "moe_balance.pt").exists():
            self.balancer.load_state_dict(load_torch(path / "moe_balance.pt"))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
        rng_file = path / "rng" / f"rank_{self.dist.rank:05d}.pt"
        if rng_file.exists():
            set_rng_state(load_rng_state(rng_file))
        else:  # resumed on more ranks than saved: derive a fresh, deterministic stream for this rank
            torch.manual_seed(self.cfg.trainer.seed * 100003 + self.step * 1009 + self.dist.rank)
        self._info(f"resumed from {path} at step {self.step}")

    def export_hf(self, path, dtype: Optional[torch.dtype] = None) -> None:
        """Write the current weights as a Hugging Face directory (:func:`longtrain.models.to_hf`).

        Collective (every rank calls it; ZeRO-3 shards and the fp32 master weights are gathered);
        the writing rank writes.
        """
        from longtrain.models import to_hf

        bias = None if self.balancer is None else self.balancer.bias
        if bias is not None and bias.abs().max() > 0 and self.dist.is_writer:
            log.warning("export_hf: the MoE routing bias (moe.balance.bias_update_rate) has no place in the Hugging "
                        "Face %s format; the exported model routes without it (the bias stays in the checkpoints)",
                        self.model_args.arch)
        state = self.engine.full_state_dict()
        if self.dist.is_writer:
            model = Transformer(self.model_args)
            model.load_state_dict(state, strict=False)
            to_hf(model, path, dtype=dtype)
        barrier()
