"""Checkpoint manager: directories, atomic publication, the ``latest`` pointer and retention.

The manager owns *where* and *when*; the trainer supplies *what* through a ``write(dir)``
callback that every rank calls (ZeRO-style shards included). Layout under ``root``::

    step_00000010/manifest.json   # step, meta, world_size, time, every file's size and sha256
    step_00000010/...             # whatever the ranks wrote
    latest                        # one line: the name of the newest published checkpoint

A checkpoint is written to ``.tmp-step_*`` and only renamed into place once every rank has
finished and the manifest is on disk, so a crash at any point leaves the previous checkpoint and
``latest`` usable. A checkpoint is *complete* when its manifest exists and every listed file has
its recorded size (:func:`verify`).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` (zero-padded so names sort by step)."""
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    # Makes renames and new entries durable; not every platform can fsync a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _hash_and_sync(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def verify(path: Union[str, Path], check_hashes: bool = False) -> List[str]:
    """List what is wrong with the checkpoint at ``path`` (empty when it is complete).

    Args:
        path: a checkpoint directory.
        check_hashes: also recompute every file's sha256 (reads all bytes).
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return [f"{path}: missing {MANIFEST}"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path}: unreadable {MANIFEST} ({e})"]
    problems = []
    for entry in files:
        f = path / entry["path"]
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != entry["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif check_hashes and _hash_and_sync(f) != entry["sha256"]:
            problems.append(f"{f}: sha256 differs from the manifest")
    return problems


def load_meta(path: Union[str, Path]) -> Dict[str, Any]:
    """The ``meta`` dict stored in the manifest of the checkpoint at ``path``."""
    return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))["meta"]


class CheckpointManager:
    """Saves, publishes, finds and prunes checkpoints under one root; rank-aware.

    Args:
        root: checkpoints folder, e.g. ``<run.dir>/checkpoints``.
        keep: number of complete checkpoints to keep (oldest deleted first).
        rank: this process's global rank; rank 0 does all directory bookkeeping.
        world_size: number of ranks that call :meth:`save` together.
        barrier: waits for every rank; defaults to ``torch.distributed.barrier`` when
            ``world_size > 1`` and a no-op alone.
    """

    verify = staticmethod(verify)
    load_meta = staticmethod(load_meta)

    def __init__(self, root: Union[str, Path], keep: int, rank: int = 0, world_size: int = 1,
                 barrier: Optional[Callable[[], None]] = None) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep: must be at least 1, got {keep}")
        if barrier is None and world_size > 1:
            if not dist.is_initialized():
                raise ValueError("CheckpointManager: world_size > 1 needs a barrier or an initialised process group")
            barrier = dist.barrier
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier or (lambda: None)

    def save(self, step: int, write: Callable[[Path], None], meta: Dict[str, Any]) -> Path:
        """Write, publish and prune a checkpoint of ``step``; every rank must call this.

        Args:
            step: optimizer step the state corresponds to.
            write: called on every rank with the temporary directory; each rank writes its own
                files there (distinct names per rank).
            meta: JSON-serialisable dict stored in the manifest (see :func:`load_meta`).

        Returns:
            The published checkpoint directory ``root/step_XXXXXXXX``.
        """
        name = step_dir_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crashed save of the same step
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier()
        write(tmp)
        self._barrier()
        if self.rank == 0:
            self._write_manifest(tmp, step, meta)
            self._publish(tmp, final)
            self._write_latest(name)
            self._prune(keep_name=name)
        self._barrier()
        return final

    def _write_manifest(self, tmp: Path, step: int, meta: Dict[str, Any]) -> None:
        paths = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
        # sha256 dominates save time for big checkpoints; hashlib releases the GIL, so threads help.
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
            digests = list(pool.map(_hash_and_sync, paths))
        manifest = {
            "step": step,
            "world_size": self.world_size,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "meta": meta,
            "files": [{"path": p.relative_to(tmp).as_posix(), "bytes": p.stat().st_size, "sha256": d}
                      for p, d in zip(paths, digests)],
        }
        for d in sorted({p.parent for p in paths} | {tmp}):
            _fsync_dir(d)
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))

    def _publish(self, tmp: Path, final: Path) -> None:
        # Re-saving a step: move the old copy aside first. If we crash between the two renames,
        # `latest` may name a missing directory and `auto` falls back to the newest complete one.
        old = self.root / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        if old.exists():
            shutil.rmtree(old)

    def _write_latest(self, name: str) -> None:
        atomic_write_text(self.root / LATEST, name + "\n")

    def _prune(self, keep_name: str) -> None:
        complete = [d for d in self._step_dirs() if not verify(d)]
        excess = len(complete) - self.keep
        for d in complete:  # oldest first
            if excess <= 0:
                break
            if d.name == keep_name:  # never the one just published
                continue
            log.info("checkpoint: deleting %s (keep=%d)", d, self.keep)
            shutil.rmtree(d, ignore_errors=True)
            excess -= 1

    def _step_dirs(self, root: Optional[Path] = None) -> List[Path]:
        """``step_*`` directories of ``root`` sorted by step, oldest first (temporaries excluded)."""
        root = self.root if root is None else root
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def _warn(self, msg: str, *args: Any) -> None:
        if self.rank == 0:
            log.warning(msg, *args)

    def latest_in(self, root: Optional[Path] = None) -> Optional[Path]:
        """The checkpoint ``root/latest`` names if complete, else the newest complete one, else None."""
        root = self.root if root is None else Path(root)
        pointer = root / LATEST
        named, problems = None, []
        if pointer.is_file():
            named = root / pointer.read_text(encoding="utf-8").strip()
            problems = verify(named)
            if not problems:
                return named
        for d in reversed(self._step_dirs(root)):
            if d == named:
                continue
            bad = verify(d)
            if bad:
                self._warn("checkpoint: skipping incomplete %s (%s)", d, "; ".join(bad[:3]))
                continue
            if named is not None:
                self._warn("checkpoint: %s named by %s is unusable (%s); using %s instead",
                           named, pointer, "; ".join(problems[:3]), d)
            elif self.rank == 0:
                log.info("checkpoint: no %s pointer in %s; using newest complete %s", LATEST, root, d)
            return d
        if named is not None:
            self._warn("checkpoint: %s named by %s is unusable (%s) and no other checkpoint is complete",
                       named, pointer, "; ".join(problems[:3]))
        return None

    def resolve_resume(self, spec: str) -> Optional[Path]:
        """Turn ``checkpoint.resume`` into a checkpoint directory, or None for a fresh start.

        Args:
            spec: ``none``; ``auto`` (latest complete checkpoint under ``root``, if any); or a path
                to a checkpoint directory, a checkpoints root, or a run directory.

        Raises:
            ValueError: the path holds no complete checkpoint.
        """
        if spec.strip().lower() == "none":
            return None
        if spec.strip().lower() == "auto":
            found = self.latest_in(self.root)
            if found is None and self.rank == 0:
                log.info("checkpoint: nothing to resume under %s; starting fresh", self.root)
            return found
        path = Path(spec).expanduser()
        missing = ValueError(f"checkpoint.resume: no checkpoint at '{spec}' (pass auto, none, or a checkpoint directory)")
        if (path / MANIFEST).is_file():
            problems = verify(path)
            if problems:
                raise ValueError(f"checkpoint.resume: '{spec}' is incomplete: " + "; ".join(problems[:5]))
            return path
        for root in (path, path / "checkpoints"):
            if (root / LATEST).is_file() or self._step_dirs(root):
                found = self.latest_in(root)
                if found is None:
                    raise missing
                return found
        raise missing


# Content helpers: the trainer picks file names and calls these from its `write` callback.
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
    """``torch.save`` (optimizer, scheduler, RNG states)."""
    torch.save(obj, path)


def load_torch(path: Union[str, Path]) -> Any:
    """``torch.load`` on CPU with ``weights_only=False``: only load checkpoints you trust."""
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> Dict[str, Any]:
    """Every random generator this process uses: python, numpy, torch CPU and all CUDA devices."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state` (CUDA states only where devices exist)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
