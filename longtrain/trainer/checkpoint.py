"""Checkpoint manager: directories, atomic publication, the ``latest`` pointer and retention.

The manager owns *where* and *when*; the trainer supplies *what* through a ``write(dir)``
callback that every rank calls (ZeRO-style shards included). Layout under ``root``::

    step_00000010/manifest.json   # step, meta, world_size, time, every file's size and sha256
    step_00000010/...             # whatever the ranks wrote
    latest                        # one line: the name of the newest published checkpoint

A checkpoint is written to ``.tmp-step_*`` and only renamed into place once every rank has
finished and the manifest is on disk, so a crash at any point leaves the previous checkpoint and
``latest`` usable. A save that fails on any rank (a full disk, most often) is abandoned on every
rank: the temporary directory is removed and :class:`CheckpointError` names the path and the
cause. A checkpoint is *complete* when its manifest exists and every listed file has its recorded
size (:func:`verify`); resuming with ``check_hashes`` also recomputes the sha256 of every file of
the checkpoint it picks (split over the ranks), so bytes flipped at the same size are caught too.

What the files hold (model weights as safetensors, torch objects, RNG states), atomic writes and
hashing are :mod:`longtrain.io`.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch.distributed as dist

from longtrain.io import atomic_write_text, fsync_dir, sha256_file
from longtrain.trainer.faults import TrainingFault


log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` (zero-padded so names sort by step)."""
    return f"step_{step:08d}"


class CheckpointError(TrainingFault):
    """A checkpoint could not be saved; the previous one is still the latest."""


def _manifest_files(path: Path) -> Union[List[Dict[str, Any]], str]:
    """The manifest's file entries, or what is wrong with the manifest."""
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"{path}: missing {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable {MANIFEST} ({e})"


def _hash_problems(path: Path, entries: List[Dict[str, Any]]) -> List[str]:
    """Files of ``entries`` whose sha256 differs from the manifest (hashed in threads: hashlib
    releases the GIL, so reading and hashing overlap)."""
    if not entries:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
        digests = list(pool.map(lambda e: sha256_file(path / e["path"]), entries))
    return [f"{path / e['path']}: sha256 differs from the manifest" for e, d in zip(entries, digests)
            if d != e["sha256"]]


def verify(path: Union[str, Path], check_hashes: bool = False) -> List[str]:
    """List what is wrong with the checkpoint at ``path`` (empty when it is complete).

    Args:
        path: a checkpoint directory.
        check_hashes: also recompute every file's sha256 (reads all bytes).
    """
    path = Path(path)
    files = _manifest_files(path)
    if isinstance(files, str):
        return [files]
    problems = []
    for entry in files:
        f = path / entry["path"]
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != entry["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, manifest says {entry['bytes']}")
    if check_hashes and not problems:
        problems = _hash_problems(path, files)
    return problems


def _describe_failure(err: BaseException, root: Path) -> str:
    """Why a save failed, in a few words: a full disk is said so (torch.save reports it as a
    RuntimeError, so the free space is given whatever the exception)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = f"the disk is full ({err.strerror})"
    else:
        cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    try:
        cause += f"; {shutil.disk_usage(root).free / 2**30:.2f} GiB free there"
    except OSError:
        pass
    return cause


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
        all_gather: every rank's object in rank order (how the ranks agree that a save worked
            and share a resume decision); defaults to ``torch.distributed.all_gather_object``
            when ``world_size > 1`` and ``[obj]`` alone.
    """

    verify = staticmethod(verify)
    load_meta = staticmethod(load_meta)

    def __init__(self, root: Union[str, Path], keep: int, rank: int = 0, world_size: int = 1,
                 barrier: Optional[Callable[[], None]] = None,
                 all_gather: Optional[Callable[[Any], List[Any]]] = None) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep: must be at least 1, got {keep}")
        if (barrier is None or all_gather is None) and world_size > 1 and not dist.is_initialized():
            raise ValueError("CheckpointManager: world_size > 1 needs a barrier and an all_gather, or an "
                             "initialised process group")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier or (dist.barrier if world_size > 1 else (lambda: None))
        self._all_gather = all_gather or (_all_gather_object if world_size > 1 else (lambda obj: [obj]))

    def save(self, step: int, write: Callable[[Path], None], meta: Dict[str, Any]) -> Path:
        """Write, publish and prune a checkpoint of ``step``; every rank must call this.

        Args:
            step: optimizer step the state corresponds to.
            write: called on every rank with the temporary directory; each rank writes its own
                files there (distinct names per rank).
            meta: JSON-serialisable dict stored in the manifest (see :func:`load_meta`).

        Returns:
            The published checkpoint directory ``root/step_XXXXXXXX``.

        Raises:
            CheckpointError: on every rank, when writing failed on any rank (e.g. a full disk) or
                rank 0 could not publish; the temporary directory is removed and ``latest``
                still names the previous checkpoint.
        """
        name = step_dir_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crashed save of the same step
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier()
        self._agree(lambda: write(tmp), step, tmp, final)  # in place of a barrier: every rank's outcome
        if self.rank == 0:
            def publish() -> None:
                self._write_manifest(tmp, step, meta)
                self._publish(tmp, final)
                self._write_latest(name)
        else:
            publish = None
        self._agree(publish, step, tmp, final)
        if self.rank == 0:
            self._prune(keep_name=name)
        self._barrier()
        return final

    def _agree(self, action: Optional[Callable[[], None]], step: int, tmp: Path, final: Path) -> None:
        """Run ``action`` here, then share every rank's outcome; if any failed, rank 0 removes
        ``tmp`` and every rank raises the same :class:`CheckpointError`."""
        error, cause_here = None, None
        if action is not None:
            try:
                action()
            except Exception as err:  # noqa: BLE001 - every failure must reach the other ranks
                error, cause_here = _describe_failure(err, self.root), err
        failures = [(rank, e) for rank, e in enumerate(self._all_gather(error)) if e is not None]
        if not failures:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        pointer = self.root / LATEST
        previous = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        rank, cause = failures[0]
        kept = f"the latest checkpoint is still {self.root / previous}" if previous else "no earlier checkpoint exists"
        fix = f"free space under {self.root}" if "disk is full" in cause else "fix the cause"
        raise CheckpointError(f"checkpoint: could not save step {step} to {final} (rank {rank}: {cause}); the "
                              f"partial copy was removed and {kept}; {fix} and resume with "
                              "checkpoint.resume=auto") from cause_here

    def _write_manifest(self, tmp: Path, step: int, meta: Dict[str, Any]) -> None:
        paths = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
        # sha256 dominates save time for big checkpoints; hashlib releases the GIL, so threads help.
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
            digests = list(pool.map(lambda p: sha256_file(p, sync=True), paths))
        manifest = {
            "step": step,
            "world_size": self.world_size,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "meta": meta,
            "files": [{"path": p.relative_to(tmp).as_posix(), "bytes": p.stat().st_size, "sha256": d}
                      for p, d in zip(paths, digests)],
        }
        for d in sorted({p.parent for p in paths} | {tmp}):
            fsync_dir(d)
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
        fsync_dir(self.root)
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

    def latest_in(self, root: Optional[Path] = None, exclude: Sequence[Path] = ()) -> Optional[Path]:
        """The checkpoint ``root/latest`` names if complete, else the newest complete one, else None.

        Args:
            root: checkpoints folder (default: this manager's).
            exclude: checkpoints already found corrupted (skipped like incomplete ones).
        """
        root = self.root if root is None else Path(root)
        pointer = root / LATEST
        named, problems = None, []
        if pointer.is_file():
            named = root / pointer.read_text(encoding="utf-8").strip()
            problems = ["failed the sha256 check"] if named in exclude else verify(named)
            if not problems:
                return named
        for d in reversed(self._step_dirs(root)):
            if d == named or d in exclude:
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

    def resolve_resume(self, spec: str, check_hashes: bool = False) -> Optional[Path]:
        """Turn ``checkpoint.resume`` into a checkpoint directory, or None for a fresh start.

        Args:
            spec: ``none``; ``auto`` (latest complete checkpoint under ``root``, if any); or a path
                to a checkpoint directory, a checkpoints root, or a run directory.
            check_hashes: also recompute the sha256 of every file of the chosen checkpoint, and
                fall back to the previous one if any differs. Collective: rank 0 chooses, each
                rank hashes every ``world_size``-th file, so resuming reads the checkpoint once
                more in all (its size over the ranks' combined read bandwidth).

        Raises:
            ValueError: the path holds no complete checkpoint; or ``auto`` finds checkpoints
                but none is usable (rather than silently starting the run again).
        """
        if not check_hashes:
            return self._resolve(spec, ())
        rejected: List[Path] = []
        while True:
            found, error = None, None
            if self.rank == 0:
                try:
                    found = self._resolve(spec, rejected)
                except ValueError as err:
                    error = str(err)
            found, error = self._all_gather((found, error))[0]
            if error is not None:
                raise ValueError(error)
            if found is None:
                return None
            files = _manifest_files(found)
            problems = self.check_shared(files if isinstance(files, list) else [],
                                         lambda mine, found=found: _hash_problems(found, mine))
            if not problems:
                return found
            if spec.strip().lower() != "auto" and (Path(spec).expanduser() / MANIFEST).is_file():
                raise ValueError(f"checkpoint.resume: '{spec}' is corrupted: " + "; ".join(problems[:5])
                                 + self._previous_intact(Path(spec).expanduser()))
            self._warn("checkpoint: %s is corrupted (%s); falling back to the previous checkpoint", found,
                       "; ".join(problems[:3]))
            rejected.append(found)

    def check_shared(self, items: Sequence[Any], check: Callable[[List[Any]], List[str]]) -> List[str]:
        """The problems ``check`` finds in ``items``, each rank checking every ``world_size``-th
        (its share): every rank's, on every rank. Collective."""
        return [p for part in self._all_gather(check(list(items)[self.rank::self.world_size])) for p in part]

    def _resolve(self, spec: str, exclude: Sequence[Path]) -> Optional[Path]:
        if spec.strip().lower() == "none":
            return None
        if spec.strip().lower() == "auto":
            found = self.latest_in(self.root, exclude)
            if found is None and (self._step_dirs() or (self.root / LATEST).is_file()):
                raise ValueError(f"checkpoint.resume=auto: {self.root} holds checkpoints but none is complete and "
                                 "intact (see the warnings above); restore one, or move them away to start again")
            if found is None and self.rank == 0:
                log.info("checkpoint: nothing to resume under %s; starting fresh", self.root)
            return found
        path = Path(spec).expanduser()
        missing = ValueError(f"checkpoint.resume: no checkpoint at '{spec}' (pass auto, none, or a checkpoint directory)")
        if (path / MANIFEST).is_file():
            problems = verify(path)
            if problems:
                raise ValueError(f"checkpoint.resume: '{spec}' is incomplete: " + "; ".join(problems[:5])
                                 + self._previous_intact(path))
            return path
        for root in (path, path / "checkpoints"):
            if (root / LATEST).is_file() or self._step_dirs(root):
                found = self.latest_in(root, exclude)
                if found is None:
                    raise missing
                return found
        raise missing


    def _previous_intact(self, path: Path) -> str:
        """The way out after an explicitly named checkpoint was refused: the newest complete one
        saved before it in the same folder (sizes checked), or how to start fresh."""
        step = _STEP_RE.match(path.name)
        older = [d for d in self._step_dirs(path.parent)
                 if step is None or int(_STEP_RE.match(d.name).group(1)) < int(step.group(1))]
        for d in reversed(older):
            if d != path and not verify(d):
                return f"; the previous intact checkpoint is {d}: pass checkpoint.resume={d}"
        return f"; no earlier intact checkpoint is in {path.parent}: start fresh with checkpoint.resume=none"


def _all_gather_object(obj: Any) -> List[Any]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
