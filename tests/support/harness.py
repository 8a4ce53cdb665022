"""The multi-process harness of the distributed tests: ranks in spawned processes on one machine.

``run_ranks(fn, world, *args)`` starts ``world`` processes, joins them into one process group (gloo
on CPU) and returns what ``fn(rank, world, *args)`` returned on each rank, in rank order. A rank
that raises (a failed ``assert`` included) or dies fails the caller with that rank's traceback.

``run_jobs(world, jobs)`` runs several Trainer jobs one after the other in one such group (the
ZeRO, StreamBP and MoE balancing tests) and returns rank 0's results by job name.

``fn``, its arguments and its return value cross process boundaries: ``fn`` must be a module-level
function (of a test module or this package) and everything else picklable. Tensors come back as
copies (``torch.save``/``torch.load``), never through shared memory.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.multiprocessing as mp
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

INITS = ("torch", "longtrain")
_DIST_INFO = None  # the DistInfo of this rank, when run_ranks joined the group with init="longtrain"


class RankFailed(Exception):
    """A rank of :func:`run_ranks` raised or died; the message holds its traceback or exit status."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dist_info():
    """This rank's ``longtrain.parallel.distributed.DistInfo``, inside a function run by
    :func:`run_ranks` with ``init="longtrain"`` (None otherwise)."""
    return _DIST_INFO


def _rank_main(rank: int, fn: Callable, world: int, args: tuple, port: int, backend: str, timeout: float,
               init: str, require_group: bool, device: str, out_dir: str) -> None:
    global _DIST_INFO
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if init == "longtrain":
            from longtrain.parallel.distributed import init_distributed

            _DIST_INFO = init_distributed(device, backend, int(timeout), require_group=require_group)
        else:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except Exception:  # for the parent's report, which shows every rank that raised
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        _DIST_INFO = None
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, backend: str = "gloo", timeout: float = 300,
              init: str = "torch", require_group: bool = True, device: str = "cpu",
              deadline: Optional[float] = 850) -> List[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks, each in its own spawned process; return the
    per-rank return values in rank order.

    Each process gets the rendezvous environment (MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK,
    WORLD_SIZE, LOCAL_RANK, OMP_NUM_THREADS=1; ``torch.set_num_threads(1)``), joins the process group
    before ``fn`` runs and leaves it after ``fn`` returns or raises.

    Args:
        fn: a module-level function ``fn(rank, world, *args)``; its return value must be picklable.
        world: the number of ranks (1 is allowed).
        backend: the process-group backend.
        timeout: the collective timeout in seconds, so a rank waiting on a failed one gives up.
        init: ``"torch"``: ``torch.distributed.init_process_group`` from the environment;
            ``"longtrain"``: ``longtrain.parallel.distributed.init_distributed(device, backend,
            timeout, require_group)``, as the trainer joins (its DistInfo is :func:`dist_info`).
        require_group: with ``init="longtrain"`` and one rank, start a one-rank group anyway (the
            DeepSpeed engine needs one); without it a single rank runs with no group.
        device: with ``init="longtrain"``: ``cpu``, ``cuda`` or ``auto``.
        deadline: wall seconds for the whole run; past it every rank is killed and RankFailed raised.

    Raises:
        RankFailed: a rank raised (the message holds its traceback), died, or the deadline passed.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    with tempfile.TemporaryDirectory(prefix="ranks-") as out_dir:
        context = mp.start_processes(_rank_main, nprocs=world, join=False, start_method="spawn",
                                     args=(fn, world, args, free_port(), backend, timeout, init, require_group,
                                           device, out_dir))
        end = None if deadline is None else time.monotonic() + deadline
        try:
            while not context.join(timeout=1.0):
                if end is not None and time.monotonic() > end:
                    raise RankFailed(f"{world} rank(s) running {fn.__qualname__} did not finish within "
                                     f"{deadline:.0f} s; killed")
            failed = False
        except (ProcessRaisedException, ProcessExitedException):
            failed = True
        finally:
            for process in context.processes:  # after a deadline or an interrupt: none may outlive the test
                if process.is_alive():
                    process.kill()
                    process.join()
        if failed:
            raise RankFailed(_failure_report(fn, world, context.processes, Path(out_dir)))
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _failure_report(fn: Callable, world: int, processes, out_dir: Path) -> str:
    """Every rank that raised, in the order they raised (a rank that fails often makes the others
    fail in their next collective: the first traceback is the likely cause), then every rank that
    died without raising (killed, ``os._exit``) other than those the clean-up ended."""
    errs = sorted(out_dir.glob("rank*.err"), key=lambda p: p.stat().st_mtime_ns)
    lines = [f"rank {p.stem[4:]} of {world} raised in {fn.__qualname__}:\n{p.read_text()}" for p in errs]
    raised = {int(p.stem[4:]) for p in errs}
    for rank, process in enumerate(processes):
        code = process.exitcode
        if rank in raised or code in (0, None, -signal.SIGTERM, -signal.SIGKILL):
            continue
        lines.append(f"rank {rank} of {world} died in {fn.__qualname__} "
                     f"({f'signal {-code}' if code < 0 else f'exit code {code}'})")
    return "\n".join(lines) or f"a rank of {world} running {fn.__qualname__} was killed"


# ------------------------------------------------------------------ Trainer jobs in one process group
Job = Tuple[str, Sequence[str], Dict[str, Any]]


def full_grads(trainer) -> Dict[str, torch.Tensor]:
    """The full (unsharded) gradients after a backward, by parameter name, through the step engine
    (gathered from DeepSpeed's shards under ZeRO); then cleared."""
    grads = trainer.engine.full_grads()
    trainer.engine.zero_grad()
    return grads


def _run_jobs_rank(rank: int, world: int, jobs: Sequence[Job]) -> Optional[Dict[str, dict]]:
    from longtrain.trainer.loop import Trainer
    from support.helpers import compose_cfg

    out = {}
    for name, overrides, opts in jobs:
        cfg = compose_cfg(overrides)
        trainer = Trainer(cfg, dist_info())
        if opts.get("setup") is not None:
            opts["setup"](trainer)
        result = {}
        probe = opts.get("probe")  # probe(trainer, result): a callable run after the first step's backward
        if opts.get("grads"):
            result["loss"], _ = trainer.forward_backward()
            if probe is not None:
                probe(trainer, result)
            result["grads"] = full_grads(trainer)
        trainer.fit()
        if opts.get("export"):
            trainer.export_hf(opts["export"])
        if rank == 0:
            lines = (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
            result["metrics"] = [json.loads(x) for x in lines]
            out[name] = result
    return out if rank == 0 else None


def run_jobs(world: int, jobs: Sequence[Job], timeout: float = 300) -> Dict[str, dict]:
    """Run Trainer ``jobs`` one after the other in one process group of ``world`` ranks (joined as
    the trainer joins: ``init_distributed``, with a group even alone); return rank 0's results by
    job name.

    Each job is ``(name, overrides, options)``: the overrides compose a config
    (:func:`support.helpers.compose_cfg`) for a ``Trainer`` that then runs ``fit()``. Options:
    ``grads`` (record the first step's ``loss`` and full gradients ``grads``, before ``fit()``),
    ``export`` (a path: ``export_hf`` after ``fit()``), ``setup(trainer)`` (called before the first
    step) and ``probe(trainer, result)`` (after the recorded step's backward). Every result holds
    ``metrics``: the run's ``metrics.jsonl`` records.
    """
    return run_ranks(_run_jobs_rank, world, jobs, init="longtrain", timeout=timeout)[0]
