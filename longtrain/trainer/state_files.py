"""A checkpoint's pickled state files are loaded as data, never as code.

``torch.save`` files are pickles, and unpickling calls whatever functions the file names: a
checkpoint from someone else (a shared file system, a downloaded run) could run any command when
resumed. longtrain writes its own state (optimizer, scheduler, MoE balancer, RNG) as tensors,
numbers, strings and containers and reads it with torch's restricted loader (``weights_only=True``)
(:func:`longtrain.io.load_torch`). DeepSpeed reads its own ZeRO files with full unpickling, so
before any of them reaches DeepSpeed every ``.pt`` file of the checkpoint (every one on disk, listed
in the manifest or not) is loaded once with the restricted loader, mapped rather than read, allowing
besides plain values only the data classes DeepSpeed itself stores
(:func:`~longtrain.parallel.zero_checkpoint.state_globals`) under ``zero/`` and, under ``rng/``,
numpy's array type (RNG files of earlier versions). A file naming anything else is refused with the
file and the global it names, before the run builds anything.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import List, Sequence, Tuple

from longtrain.config import ConfigError
from longtrain.io import LEGACY_RNG_GLOBALS, UnsafeStateFile, load_torch, numpy_reconstruct
from longtrain.parallel.zero_checkpoint import ZERO_DIR, state_globals

RNG_DIR = "rng"


def pickles(checkpoint: Path) -> List[Path]:
    """Every ``.pt`` file under ``checkpoint``, sorted (what any loader could open)."""
    return sorted(p for p in Path(checkpoint).rglob("*.pt") if p.is_file())


def allowed_globals(checkpoint: Path, path: Path) -> Tuple:
    """The globals ``path`` may name besides plain values (module docstring)."""
    top = Path(path).relative_to(checkpoint).parts[0]
    if top == ZERO_DIR:
        return state_globals()
    if top == RNG_DIR:
        return (*LEGACY_RNG_GLOBALS, numpy_reconstruct())
    return ()


def unsafe(checkpoint: Path, paths: Sequence[Path]) -> List[str]:
    """What is wrong with each of ``paths`` (files of ``checkpoint``) that loading could not take
    as data: one line each, empty when all are data."""
    problems = []
    for path in paths:
        try:
            load_torch(path, allowed_globals(checkpoint, path), mmap=zipfile.is_zipfile(path))
        except UnsafeStateFile as refused:
            problems.append(str(refused))
        except Exception as err:  # noqa: BLE001 - anything the restricted loader cannot read is not loaded at all
            problems.append(f"'{path}' is not a state file torch's restricted loader can read "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    return problems


def refusal(key: str, problems: Sequence[str]) -> ConfigError:
    """The error for ``problems`` (:func:`unsafe`) of the checkpoint given by ``key``."""
    more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
    return ConfigError(f"{key}: {problems[0]}{more}; use a checkpoint you trust, or one longtrain wrote")


def check(checkpoint: Path, key: str, under: str = "") -> None:
    """Refuse ``checkpoint`` (given by ``key``) when a ``.pt`` file under it (only under its folder
    ``under``, when given) would run code when loaded (:func:`unsafe`); one process.

    Raises:
        ConfigError: naming ``key``, the first such file and the global it names.
    """
    root = Path(checkpoint) / under if under else Path(checkpoint)
    problems = unsafe(Path(checkpoint), pickles(root)) if root.is_dir() else []
    if problems:
        raise refusal(key, problems)


__all__ = ["RNG_DIR", "allowed_globals", "check", "pickles", "refusal", "unsafe"]
