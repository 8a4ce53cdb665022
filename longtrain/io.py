"""Generic file I/O for every layer: writes that readers never see half done, file hashing, figures,
and the files training state is kept in.

Every file a run writes next to its training state (metrics, the resolved config, checkpoint
manifests and the ``latest`` pointer, plots) goes through :func:`atomic_write_bytes`: the bytes go
to a temporary file beside the target, are flushed to disk, and the temporary file is renamed over
the target, so a reader (or a run resumed after a crash) finds the old content or the new one.

Training state: the model's weights as safetensors (each tied tensor once, :func:`save_model`),
torch objects (optimizer, scheduler: :func:`save_torch`) and every random generator's state
(:func:`rng_state`). The trainer and the step engines pick the file names and call these from the
``write`` callback they give :meth:`longtrain.trainer.checkpoint.CheckpointManager.save`, which owns
where and when.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import numpy as np
import torch
from torch import nn

PathLike = Union[str, Path]


def fsync_dir(path: PathLike) -> None:
    """Make renames and new entries in the directory ``path`` durable (where the platform can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every platform can fsync a directory


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old or the new content, never a mix.

    The temporary file is ``.<name>.tmp`` in the same directory (a rename is atomic only within
    one file system); it is fsynced before the rename and the directory after it.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig, png_path: PathLike) -> Path:
    """Write a matplotlib figure as PNG with :func:`atomic_write_bytes`; returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(png_path, buffer.getvalue())


def sha256_file(path: PathLike, sync: bool = False) -> str:
    """Hex sha256 of the file at ``path``, read in 4 MiB blocks.

    Args:
        path: the file.
        sync: also fsync the file (after it is read: the hash pass doubles as the flush).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _alias_groups(state: Dict[str, torch.Tensor]) -> List[List[str]]:
    """Names grouped by the exact tensor view they hold (tied weights), in state-dict order."""
    groups: Dict[tuple, List[str]] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def save_model(model: nn.Module, path: Union[str, Path]) -> None:
    """Save ``model``'s state dict to safetensors, each tied tensor once (under its first name)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    tied: Dict[str, str] = {}
    seen_storage = set()
    for names in _alias_groups(state):
        t = state[names[0]].detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:  # a different view of a storage already saved: safetensors needs a copy
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        tensors[names[0]] = t
        tied.update({alias: names[0] for alias in names[1:]})
    save_file(tensors, str(path), metadata={"tied": json.dumps(tied)})


def load_model(model: nn.Module, path: Union[str, Path]) -> None:
    """Load a :func:`save_model` file into ``model``; every key must match except tied duplicates.

    Raises:
        ValueError: keys missing from the file or unknown to the model (both listed).
    """
    from safetensors.torch import load_file

    loaded = load_file(str(path), device="cpu")
    state = model.state_dict()
    missing = [n for g in _alias_groups(state) if not any(a in loaded for a in g) for n in g]
    unexpected = [n for n in loaded if n not in state]
    if missing or unexpected:
        raise ValueError(f"load_model: {path} does not match the model; missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys, result


def save_torch(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` of a state made of tensors, numbers, strings and containers (optimizer,
    scheduler, balancer, RNG states): :func:`load_torch` reads it back without unpickling code."""
    torch.save(obj, path)


class UnsafeStateFile(ValueError):
    """A state file holds a pickled global (a function or class) that loading would call: code, not data."""


def load_torch(path: Union[str, Path], allowed: Sequence[Any] = (), mmap: bool = False) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``: tensors, numbers, strings and containers,
    plus the classes and functions in ``allowed`` (plain-data types of a library, e.g. DeepSpeed's
    loss scaler); a file that names any other global is refused before any of it is called.

    Args:
        mmap: map the file instead of reading it (a check that only unpickles).

    Raises:
        UnsafeStateFile: naming the file and the globals it would call.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeStateFile(f"'{path}' holds {_disallowed(path, allowed, err)}, which loading it would call "
                              "(code, not data); longtrain loads state files as tensors and plain values only") from None


def _disallowed(path: Union[str, Path], allowed: Sequence[Any], err: Exception) -> str:
    """The globals of ``path`` outside torch's allow-list and ``allowed``, as a phrase."""
    with torch.serialization.safe_globals(list(allowed)):
        try:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - the scan is for the message only; the load already refused
            names = []
    if names:
        return ("the global " if len(names) == 1 else "the globals ") + ", ".join(names)
    found = re.search(r"Unsupported (global|operand)[^\n]*", str(err))  # pushed dynamically: torch's words
    return found.group(0).rstrip(".") if found else "a pickle torch's restricted loader refuses"


LEGACY_RNG_GLOBALS = (np.ndarray, np.dtype, np.dtypes.UInt32DType)
"""What RNG files of earlier longtrain versions hold besides plain values (numpy's generator state
as an array): allowed when loading them (:func:`load_rng_state`), with numpy's array constructor."""


def load_rng_state(path: Union[str, Path]) -> Dict[str, Any]:
    """An RNG file (:func:`rng_state`); one written by an earlier version, with numpy's state as an
    array, loads too (:data:`LEGACY_RNG_GLOBALS`)."""
    return load_torch(path, allowed=(*LEGACY_RNG_GLOBALS, numpy_reconstruct()))


def numpy_reconstruct():
    """numpy's array constructor used by pickles (its module moved in numpy 2)."""
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


def rng_state() -> Dict[str, Any]:
    """Every random generator this process uses: python, numpy, torch CPU and all CUDA devices, as
    tensors, numbers and lists (loadable with ``weights_only=True``)."""
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": list(words), "gauss_next": gauss_next},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state` (or by an earlier version, which kept python's
    and numpy's states as their own tuples); CUDA states only where devices exist."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"]), py["gauss_next"])
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
