"""``model.init_from``: start a run from the model weights of another longtrain run's checkpoint (a
fresh optimizer, schedule and step count), e.g. to extend a trained model's context with a longer
``data.seq_len``, sequence parallelism and ``model.rope_scaling``. ``longtrain-eval --checkpoint``
loads its weights the same way."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict

from longtrain.config import ConfigError
from longtrain.io import load_model
from longtrain.models import ModelArgs, Transformer
from longtrain.parallel.zero_checkpoint import ZERO_DIR
from longtrain.trainer import state_files
from longtrain.trainer.checkpoint import CheckpointManager

FREE_KEYS = ("rope_scaling", "max_position_embeddings")
"""Geometry keys a run may change from the checkpoint it starts from (RoPE scaling to extend the context)."""


def find_checkpoint(spec: str, key: str) -> Path:
    """The checkpoint ``spec`` names: a checkpoint directory, a run's ``checkpoints/`` folder or a run
    directory (its newest complete checkpoint).

    Raises:
        ConfigError: naming ``key``: no such path, or no complete checkpoint there.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: '{spec}' does not exist; give a checkpoint directory, a run's checkpoints/ "
                          "folder or a run directory")
    try:
        found = CheckpointManager(path, keep=1).resolve_resume(str(path))
    except ValueError as err:
        raise ConfigError(str(err).replace("checkpoint.resume:", f"{key}:", 1)) from None
    if found is None:
        raise ConfigError(f"{key}: no complete checkpoint in '{spec}'")
    return found


def saved_model_args(checkpoint: Path) -> Dict:
    """The geometry a checkpoint was saved with (``trainer_state.json``'s ``model_args``)."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["model_args"]


def check_geometry(checkpoint: Path, args: ModelArgs, key: str) -> None:
    """Raise a ConfigError naming ``key`` when the checkpoint's geometry differs from ``args`` in
    anything but :data:`FREE_KEYS`."""
    saved, mine = saved_model_args(checkpoint), json.loads(json.dumps(asdict(args)))
    differ = [k for k in sorted(set(saved) | set(mine)) if k not in FREE_KEYS and saved.get(k) != mine.get(k)]
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} here" for k in differ[:4])
        raise ConfigError(f"{key}: the checkpoint '{checkpoint}' holds another model ({pairs}); give the model "
                          "keys it was trained with (its run's config.yaml)")


def check_loadable(checkpoint: Path, key: str) -> None:
    """Refuse a ZeRO ``checkpoint`` (given by ``key``) whose files DeepSpeed would unpickle into
    code (:func:`~longtrain.trainer.state_files.check`); a plain one's weights are safetensors.

    Raises:
        ConfigError: naming ``key``, the file and the global it names.
    """
    if not (checkpoint / "model.safetensors").is_file():
        state_files.check(checkpoint, key, under=ZERO_DIR)


def load_weights(model: Transformer, checkpoint: Path, key: str = "model.init_from") -> None:
    """Load the model weights of ``checkpoint`` (given by ``key``) into ``model``: plain,
    ``model.safetensors`` and nothing else; ZeRO, its fp32 shards gathered offline once every file
    DeepSpeed would unpickle has been checked (:func:`~longtrain.trainer.state_files.check`). The
    RoPE buffer is recomputed from ``model.args``.

    Raises:
        ConfigError: naming ``key``: a ZeRO file that would run code when loaded.
    """
    if (checkpoint / "model.safetensors").is_file():
        load_model(model, checkpoint / "model.safetensors")
    else:
        from longtrain.parallel.zero_checkpoint import consolidated_fp32

        check_loadable(checkpoint, key)
        model.load_state_dict(consolidated_fp32(checkpoint), strict=False)
    model.reset_rope()
