"""Faults a long job meets: preemption requests, and the one-line errors the run stops with.

Graceful stop (:class:`StopRequests`). SIGTERM or SIGUSR1 delivered to any rank, or the file
``<run.dir>/STOP`` (checked by the writing rank), asks the job to stop at the next step
boundary. The handlers only record the signal; at every boundary the ranks agree with one
all-reduce (MAX) of a small integer over the whole world, so all of them stop after the same
step, save one checkpoint and leave ``fit()`` normally (exit code 0). SLURM batch scripts create
the STOP file when their pre-timeout signal arrives; operators can create it by hand.

Fatal faults (:class:`TrainingFault`): a non-finite loss or gradient norm under
``trainer.nonfinite=stop``, too many skipped steps, a checkpoint that could not be saved, a
collective that failed because a rank died or timed out. The entry point prints the message as
one line and exits with code 1.
"""
from __future__ import annotations

import logging
import re
import signal
import threading
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_FILE = "STOP"

# Stop reasons, by priority: the all-reduce keeps the largest code, so a signal wins over the file.
_FILE, _SIGUSR1, _SIGTERM = 1, 2, 3
_REASONS = {_FILE: f"the file {STOP_FILE} exists", _SIGUSR1: "SIGUSR1", _SIGTERM: "SIGTERM"}
_CODES = {signal.SIGTERM: _SIGTERM, signal.SIGUSR1: _SIGUSR1}
_RANKS = 1 << 20  # code * _RANKS + rank: the all-reduce also says which rank asked


class TrainingFault(RuntimeError):
    """The run cannot go on (its message is one line naming the step, the key or the path)."""


class StopRequests:
    """SIGTERM, SIGUSR1 and the STOP file as a request to stop at the next step boundary.

    Args:
        stop_file: ``<run.dir>/STOP``.
        rank: this process's global rank.
        check_file: look for ``stop_file`` here (the writing rank only: one stat per step).
        device: where the flag tensor lives (the collective backend's device).

    Use as a context manager around the training loop (main thread): handlers are installed on
    entry and the previous ones restored on exit. Signals received while a stop is under way
    change nothing (SLURM can deliver SIGTERM to a worker both directly and through torchrun's
    agent; dying on the second one would lose the checkpoint); send SIGKILL to stop at once.
    """

    def __init__(self, stop_file: Path, rank: int, check_file: bool, device: torch.device) -> None:
        self.stop_file = Path(stop_file)
        self.rank = rank
        self.check_file = check_file
        self.device = device
        self._received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM and SIGUSR1 keep their handlers; %s still stops the run",
                        self.stop_file)
            return self
        for sig in _CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # Runs in the main thread between bytecodes: record only (no I/O, no locks).
        if self._received is None:
            self._received = signum

    def poll(self) -> Optional[str]:
        """Whether any rank asked to stop; collective (one all-reduce over the world).

        Returns:
            The reason (e.g. ``SIGTERM received by rank 1``), the same on every rank, or None.
        """
        code = _CODES[self._received] if self._received is not None else 0
        if code == 0 and self.check_file and self.stop_file.exists():
            code = _FILE
        flag = torch.tensor([code * _RANKS + self.rank if code else 0], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        if value == 0:
            return None
        code, rank = divmod(value, _RANKS)
        if code == _FILE:
            return f"{_REASONS[code]} ({self.stop_file})"
        return f"{_REASONS[code]} received by rank {rank}"

    def remove_file(self) -> None:
        """Delete the STOP file (writing rank, once the checkpoint is published), so that the
        requeued job does not stop at once."""
        if self.check_file:
            self.stop_file.unlink(missing_ok=True)


def is_comm_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from a collective whose peer died or timed out (gloo raises plain
    RuntimeErrors naming itself; newer torch raises ``torch.distributed.DistError``)."""
    if isinstance(err, TrainingFault):
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return any(s in text for s in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                                   "Timed out", "timed out"))


def comm_failure_message(err: BaseException, rank: int, step: int, timeout_s: int) -> str:
    """One line for a failed collective: what probably happened and the key that bounds the wait."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # drop gloo's "[path/file.cc:553]" prefix
    first = first.split(". ")[0][:200]  # gloo goes on with generic advice
    return (f"rank {rank}: a collective failed after step {step}: another rank probably died (look for the "
            f"first error in the other ranks' logs) or did not answer within parallel.timeout_s={timeout_s} s "
            f"({first})")
