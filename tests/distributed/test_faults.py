"""Faults a long job meets, on CPU: non-finite steps, preemption (SIGTERM, SIGUSR1, the STOP file),
a hard kill, corrupted checkpoints, a full disk and a dead or stuck rank.

Every run is the tiny SMALL setting of tests/support/helpers.py (a few seconds a run). Exactness: a resumed
run repeats the uninterrupted one's operations in the same order, so it matches to 1e-12 in one
process; across 1 and 2 processes only the fp32 summation order differs (1e-5, as in test_train).
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import longtrain.io as lio
from longtrain.trainer import step as step_mod
from longtrain.trainer.checkpoint import CheckpointError, verify
from longtrain.trainer.faults import TrainingFault
from longtrain.trainer.loop import Trainer
from support.harness import dist_info, free_port, run_ranks
from support.helpers import REPO, SMALL, SUPPORT, compose_cfg, read_metrics, train_in_process
from support.parity import assert_same_curve

# Subprocesses import this checkout's longtrain, whatever else is installed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240,
                   may_end: bool = False) -> None:
    """Poll metrics.jsonl until it records ``step`` or later (or, if ``may_end``, until ``proc`` ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert may_end, f"the run ended early (exit code {proc.returncode})"
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]
            if steps and steps[-1] >= step:
                return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {run_dir / 'metrics.jsonl'} after {timeout} s")


def _cli_args(tmp_path, name, overrides):
    return [f"run.dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL, *overrides]


# ---------------------------------------------------------------------------------- non-finite steps
def _state(trainer):
    """Weights and AdamW state, cloned."""
    model = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    opt = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
           for i, st in trainer.optimizer.state_dict()["state"].items()}
    return model, opt


def _assert_same_state(a, b):
    for part_a, part_b in zip(a, b):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            torch.testing.assert_close(part_a[key], part_b[key], rtol=0, atol=0)


def _poison(monkeypatch, steps, record):
    """Make the loss of ``steps`` NaN (their gradients follow) and record the weights and Adam
    state before and after each of them in ``record[step]``."""
    real_loss, real_step = step_mod.chunked_lm_loss, Trainer.train_step

    def train_step(self):
        step = self.step + 1
        if step not in steps:
            return real_step(self)
        before = _state(self)
        monkeypatch.setattr(step_mod, "chunked_lm_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
        try:
            return real_step(self)
        finally:
            monkeypatch.setattr(step_mod, "chunked_lm_loss", real_loss)
            record[step] = (before, _state(self))

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_nonfinite_skip_drops_the_step_and_training_goes_on(tmp_path, monkeypatch, capsys):
    common = ["trainer.max_steps=6", "data.micro_batch_size=2"]
    ref = train_in_process(tmp_path, "ref", common)
    record = {}
    _poison(monkeypatch, {3}, record)
    got = train_in_process(tmp_path, "skip", common + ["trainer.nonfinite=skip"])
    _assert_same_state(*record[3])  # bit for bit: no weight, moment or step count moved
    assert [m["skipped"] for m in got] == [0, 0, 1, 0, 0, 0]
    assert got[2]["loss"] != got[2]["loss"]  # NaN
    assert all(math.isfinite(m["loss"]) for m in got[3:])
    assert_same_curve(ref[:2], got[:2], 1e-12)
    # The schedule and the data still moved on: the same learning rate and batch at every step.
    assert [m["lr"] for m in got] == [m["lr"] for m in ref]
    assert [m["valid_tokens"] for m in got] == [m["valid_tokens"] for m in ref]
    assert got[3]["loss"] != ref[3]["loss"]  # step 3 left no trace: step 4 starts from step 2's weights
    # run() sets up logging to stderr (replacing pytest's log capture): read the warning there.
    assert "WARNING longtrain: non-finite loss (nan) or gradient norm (nan) at step 3: step skipped" \
        in capsys.readouterr().err


def test_nonfinite_skip_gives_up_after_max_skipped_steps(tmp_path, monkeypatch):
    record = {}
    _poison(monkeypatch, {2, 3}, record)
    with pytest.raises(TrainingFault) as err:
        train_in_process(tmp_path, "r", ["trainer.nonfinite=skip", "trainer.max_skipped_steps=2"])
    message = str(err.value)
    assert "step 3" in message and "trainer.max_skipped_steps=2" in message and "\n" not in message
    _assert_same_state(record[2][0], record[3][1])
    assert [m["skipped"] for m in read_metrics(tmp_path / "r")] == [0, 1]


def test_nonfinite_stop_raises_before_the_update(tmp_path, monkeypatch):
    record = {}
    _poison(monkeypatch, {3}, record)
    with pytest.raises(TrainingFault) as err:
        train_in_process(tmp_path, "r", [])  # trainer.nonfinite=stop is the default
    message = str(err.value)
    assert "at step 3" in message and "trainer.nonfinite=stop" in message and "\n" not in message
    _assert_same_state(*record[3])
    assert [m["step"] for m in read_metrics(tmp_path / "r")] == [1, 2]


def _zero_nan_worker(rank, world, tmp):
    from longtrain.parallel import zero as Z

    out = {}
    real_loss = step_mod.chunked_lm_loss
    for stage in (1, 2, 3):
        cfg = compose_cfg(SMALL + [f"run.dir={tmp}/z{stage}", f"data.cache_dir={tmp}/cache", f"zero.stage={stage}",
                                   "trainer.nonfinite=skip", "trainer.max_steps=3"])
        trainer = Trainer(cfg, dist_info())
        trainer.train_step()
        before = Z.full_fp32_state_dict(trainer.model)
        step_mod.chunked_lm_loss = lambda *a, **k: real_loss(*a, **k) * float("nan")
        try:
            metrics = trainer.train_step()
        finally:
            step_mod.chunked_lm_loss = real_loss
        after = Z.full_fp32_state_dict(trainer.model)
        last = trainer.train_step()
        out[stage] = {"same": all(torch.equal(before[k], after[k]) for k in before), "skipped": metrics["skipped"],
                      "applied": trainer.engine.ds.was_step_applied(), "last_loss": last["loss"],
                      "changed_after": any(not torch.equal(after[k], v)
                                           for k, v in Z.full_fp32_state_dict(trainer.model).items())}
    return out


def test_nonfinite_skip_under_zero_leaves_the_weights(tmp_path):
    # DeepSpeed checks the global gradient norm inside engine.step() and skips a non-finite update
    # itself (fp32 here, bf16 alike); the trainer reads the outcome. Every stage, one process.
    (out,) = run_ranks(_zero_nan_worker, 1, str(tmp_path), init="longtrain", timeout=120)
    for stage in (1, 2, 3):
        assert out[stage]["same"] and out[stage]["skipped"] == 1, (stage, out[stage])
        assert out[stage]["changed_after"] and out[stage]["applied"], (stage, out[stage])  # it trains on
        assert math.isfinite(out[stage]["last_loss"]), (stage, out[stage])


# ---------------------------------------------------------------------------------- graceful stop
@pytest.mark.parametrize("how", ["stop_file", "sigusr1"])
def test_stop_request_saves_and_returns(tmp_path, monkeypatch, capsys, how):
    real_step = Trainer.train_step

    def train_step(self):
        out = real_step(self)
        if self.step == 3:
            if how == "stop_file":
                (self.run_dir / "STOP").touch()
            else:
                os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    # No periodic and no final checkpoint: the one saved must be the stop's. log_every=2: the step
    # it stops after is logged all the same.
    metrics = train_in_process(tmp_path, "r", ["trainer.max_steps=8", "checkpoint.save_final=false",
                                               "logging.log_every=2"])
    run_dir = tmp_path / "r"
    assert [m["step"] for m in metrics] == [2, 3]
    assert _latest(run_dir) == "step_00000003" and verify(run_dir / "checkpoints" / "step_00000003", True) == []
    assert not (run_dir / "STOP").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers
    reason = f"the file STOP exists ({run_dir / 'STOP'})" if how == "stop_file" else "SIGUSR1 received by rank 0"
    assert f"stopping after step 3 of 8: {reason}" in capsys.readouterr().out


def _worker_pid(run_dir: Path, rank: int) -> int:
    """The pid of the torchrun worker of ``rank`` training into ``run_dir`` (found through /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"run.dir={run_dir}".encode() in cmdline and f"RANK={rank}".encode() in environ \
                and b"TORCHELASTIC_RUN_ID" in b"\0".join(environ):
            return int(proc.name)
    raise AssertionError(f"no worker of rank {rank} for {run_dir}")


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    # 2 gloo ranks under torchrun; SIGTERM reaches rank 1 only (as when one node is preempted).
    layout = ["data.micro_batch_size=1", "trainer.grad_accum=2", "trainer.max_steps=30",
              "checkpoint.save_final=false"]
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "longtrain.train", *_cli_args(tmp_path, "r", layout)]
    with open(tmp_path / "log.txt", "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_for_step(run_dir, 2, proc)
            os.kill(_worker_pid(run_dir, 1), signal.SIGTERM)
            code = proc.wait(timeout=180)
        finally:
            proc.kill()
    log_text = (tmp_path / "log.txt").read_text()
    assert code == 0, log_text[-3000:]
    stopped = read_metrics(run_dir)[-1]["step"]
    assert stopped < 30 and _latest(run_dir) == f"step_{stopped:08d}"
    assert f"stopping after step {stopped} of 30: SIGTERM received by rank 1" in log_text
    # The resumed run (one process now) continues from there as if nothing had happened.
    one = ["data.micro_batch_size=2", "trainer.grad_accum=2", "trainer.max_steps=30",
           f"trainer.stop_at_step={stopped + 2}"]
    resumed = train_in_process(tmp_path, "r", one)
    ref = train_in_process(tmp_path, "ref", one)
    assert [m["step"] for m in resumed] == list(range(1, stopped + 3))
    assert_same_curve(ref, resumed, 1e-5)


# ---------------------------------------------------------------------------------- hard kill
def test_sigkill_at_a_random_step_resumes_exactly(tmp_path):
    threshold = random.Random(1234).randint(2, 7)
    common = ["trainer.max_steps=10", "checkpoint.every=1", "data.micro_batch_size=2"]
    ref = train_in_process(tmp_path, "ref", common)
    run_dir = tmp_path / "r"
    with open(tmp_path / "log.txt", "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "longtrain.train", *_cli_args(tmp_path, "r", common)],
                                cwd=REPO, env=ENV, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_for_step(run_dir, threshold, proc)
            # Aim at the middle of the next save (its temporary directory exists for a few ms);
            # the kill lands wherever the run is if that moment is missed.
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not list((run_dir / "checkpoints").glob(".tmp-step_*/rng")):
                time.sleep(0.0005)
        finally:
            proc.kill()
    assert proc.wait() == -signal.SIGKILL
    resumed = train_in_process(tmp_path, "r", common)  # checkpoint.resume=auto is the default
    assert_same_curve(ref, resumed, 1e-5)


# ---------------------------------------------------------------------------------- corrupted checkpoints
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resume_skips_a_damaged_checkpoint(tmp_path, capsys, damage):
    common = ["trainer.max_steps=4", "checkpoint.every=1", "checkpoint.keep=3"]
    first = train_in_process(tmp_path, "r", common + ["trainer.stop_at_step=3"])
    newest = tmp_path / "r" / "checkpoints" / "step_00000003"
    weights = newest / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    else:  # same size, one bit: only the sha256 shows it
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x10
        weights.write_bytes(bytes(data))
    capsys.readouterr()
    resumed = train_in_process(tmp_path, "r", common)
    why = "sha256 differs from the manifest" if damage == "flip" else "bytes, manifest says"
    out = capsys.readouterr()
    warning = next(line for line in out.err.splitlines() if "WARNING" in line)
    assert str(newest) in warning and why in warning
    assert f"resumed from {newest.parent / 'step_00000002'} at step 2" in out.err
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert resumed[2]["loss"] == pytest.approx(first[2]["loss"], rel=1e-12)  # step 3 again, from step 2


# ---------------------------------------------------------------------------------- full disk
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = lio.save_torch

    def save_torch(obj, path):
        if "step_00000003" in str(path) and Path(path).name == "optimizer.pt":
            Path(path).write_bytes(b"\0" * 100)  # part of the file made it, then the disk was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path)

    monkeypatch.setattr(lio, "save_torch", save_torch)
    common = ["trainer.max_steps=4", "checkpoint.every=1", "checkpoint.keep=3"]
    with pytest.raises(CheckpointError) as err:
        train_in_process(tmp_path, "r", common)
    root = tmp_path / "r" / "checkpoints"
    message = str(err.value)
    assert "\n" not in message and "the disk is full" in message and str(root / "step_00000003") in message
    assert f"the latest checkpoint is still {root / 'step_00000002'}" in message
    assert _latest(tmp_path / "r") == "step_00000002" and not (root / ".tmp-step_00000003").exists()
    assert not (root / "step_00000003").exists() and verify(root / "step_00000002", check_hashes=True) == []
    monkeypatch.setattr(lio, "save_torch", real_save)
    resumed = train_in_process(tmp_path, "r", common)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------- dead or stuck rank
@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_dead_or_stuck_rank_ends_the_others_in_bounded_time(tmp_path, fault):
    # Rank 1 leaves abruptly (gloo sees the closed connection at once) or stops answering (the
    # collective waits parallel.timeout_s) when about to start step 3; rank 0 must end on its own
    # with one line naming the likely cause, not hang.
    timeout_s = 10
    port = free_port()
    overrides = _cli_args(tmp_path, "r", ["data.micro_batch_size=1", "trainer.grad_accum=2", "trainer.max_steps=50",
                                          f"parallel.timeout_s={timeout_s}"])
    procs, logs = [], []
    for rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "LONGTRAIN_TEST_FAULT": f"{fault}:1:3"}
        logs.append(open(tmp_path / f"rank{rank}.txt", "w"))
        procs.append(subprocess.Popen([sys.executable, str(SUPPORT / "fault_worker.py"), *overrides],
                                      cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        _wait_for_step(tmp_path / "r", 2, procs[0], may_end=True)
        start = time.monotonic()
        code = procs[0].wait(timeout=timeout_s + 80)
        elapsed = time.monotonic() - start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for f in logs:
            f.close()
    text = (tmp_path / "rank0.txt").read_text()
    assert code == 1, text[-3000:]
    if fault == "hang":
        assert elapsed >= timeout_s - 1, elapsed  # it did wait for the timeout, then gave up
    last = text.strip().splitlines()[-1]
    assert last.startswith("longtrain: error: rank 0: a collective failed after step 2: another rank probably died")
    assert f"parallel.timeout_s={timeout_s}" in last and "Traceback" not in text


# ---------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("override, expected", [
    ("trainer.nonfinite=ignore", "trainer.nonfinite: must be stop or skip"),
    ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps: must be at least 1"),
    ("parallel.timeout_s=0", "parallel.timeout_s: must be at least 1 second"),
    ("+zero.extra.zero_optimization.compute_grad_norm=false", "zero.extra.zero_optimization.compute_grad_norm"),
])
def test_fault_keys_are_validated(override, expected):
    overrides = [override] if "zero.extra" not in override else ["zero.stage=2", override]
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        compose_cfg(overrides)
