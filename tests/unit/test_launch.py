"""Launch scripts: launch/run.sh's torchrun command line (torchrun stubbed with echo), and
launch/slurm.sbatch under stubbed SLURM commands (command line, run directory, requeue flow)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def launch(*args, **env):
    return subprocess.run(["bash", str(REPO / "launch" / "run.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "TORCHRUN": "echo torchrun", **env}, timeout=60)


def test_passes_overrides_and_one_run_dir():
    proc = launch("--nproc", "2", "--recipe", "tiny", "trainer.max_steps=3", RUN_DIR="runs/x")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "longtrain.train",
                                   "--config-name", "tiny", "trainer.max_steps=3", "run.dir=runs/x"]


def test_default_run_dir_is_timestamped_and_user_run_dir_wins():
    words = launch().stdout.split()
    assert words[-1].startswith("run.dir=runs/tiny-")
    words = launch("run.dir=/tmp/mine").stdout.split()
    assert [w for w in words if w.startswith("run.dir=")] == ["run.dir=/tmp/mine"]


def test_unknown_recipe_is_an_error():
    proc = launch("--recipe", "nope")
    assert proc.returncode == 2
    assert "unknown recipe 'nope'" in proc.stderr and "tiny" in proc.stderr


# ------------------------------------------------------------------------------------ SLURM
# launch/slurm.sbatch runs under bash with SLURM's variables set by hand and stub commands first on
# PATH: `srun` records its argv and plays the trainer (exits at once, or waits for STOP, deletes it
# and exits 0 as the trainer's checkpoint-and-stop contract says), `scontrol` prints the hosts and
# records requeues, and $PYTHON (the environment dump) only records its call. No SLURM, no torch.
SBATCH = REPO / "launch" / "slurm.sbatch"
JOB_ID = "4242"

SRUN_STUB = r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$STUBS/srun.argv"
echo "srun start" >> "$STUBS/events"
for a in "$@"; do case "$a" in run.dir=*) run_dir="${a#run.dir=}" ;; esac; done
if [[ "${SRUN_MODE:-exit}" == trainer ]]; then
  for _ in $(seq 400); do [[ -e "$run_dir/STOP" ]] && break; sleep 0.05; done
  [[ -e "$run_dir/STOP" ]] || { echo "srun: no STOP" >> "$STUBS/events"; exit 9; }
  echo "srun saw STOP" >> "$STUBS/events"
  sleep 0.5  # the step finishes and the checkpoint is written; more signals may arrive meanwhile
  rm -f "$run_dir/STOP"
fi
echo "srun exit" >> "$STUBS/events"
exit "${SRUN_RC:-0}"
"""
SCONTROL_STUB = r"""#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\n' $STUB_HOSTS; exit 0; fi
echo "scontrol $*" >> "$STUBS/events"
"""
PYTHON_STUB = r"""#!/usr/bin/env bash
echo "python $*" >> "$STUBS/events"
if [[ "$3" == --precheck && -n "${STUB_BAD_INPUT:-}" ]]; then echo "longtrain: error: $STUB_BAD_INPUT" >&2; exit 2; fi
"""


@pytest.fixture
def slurm(tmp_path):
    """``slurm(*args, **env)``: start the batch script under stubs in tmp_path; returns a Popen whose
    ``.events()`` lists what the stubs saw and ``.srun_argv()`` srun's argv."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB), ("python", PYTHON_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RUN_DIR", "RECIPE",
                                                                        "GPUS_PER_NODE", "TORCHRUN", "SRUN_"))}
    base.update(PATH=f"{stubs}:{os.environ['PATH']}", STUBS=str(stubs), PYTHON=str(stubs / "python"),
                STUB_HOSTS="gpu-a07 gpu-a08", SLURM_JOB_ID=JOB_ID, SLURM_NNODES="1",
                SLURM_JOB_NODELIST="gpu-a[07-08]", GPUS_PER_NODE="8")

    def start(*args, **env):
        for name in ("events", "srun.argv"):
            (stubs / name).unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", str(SBATCH), *args], cwd=tmp_path, env={**base, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        events = stubs / "events"
        proc.events = lambda: events.read_text().splitlines() if events.exists() else []
        proc.srun_argv = lambda: (stubs / "srun.argv").read_text().split("\0")[:-1]
        return proc

    return start


def finish(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_scripts_parse():
    for script in (REPO / "launch").iterdir():
        if script.suffix in (".sh", ".sbatch"):
            proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert proc.returncode == 0, (script, proc.stderr)


def test_slurm_two_nodes_command_line(slurm, tmp_path):
    proc = slurm("trainer.max_steps=3", "optim.lr=1e-4", SLURM_NNODES="2", MASTER_PORT="29611")
    rc, err = finish(proc)
    assert rc == 0, err
    run_dir = tmp_path / f"runs/tiny-{JOB_ID}"
    python = str(tmp_path / "stubs" / "python")
    expected = ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                python, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8",
                f"--rdzv_id={JOB_ID}", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-a07:29611",
                "-m", "longtrain.train", "--config-name", "tiny", f"run.dir={run_dir}",
                "trainer.max_steps=3", "optim.lr=1e-4"]
    assert proc.srun_argv() == expected
    # The start-up checks run once for the whole job (16 ranks), then the environment is recorded
    # (with the exact command) before srun starts; no requeue.
    assert proc.events() == [f"python -m longtrain.train --precheck --config-name tiny run.dir={run_dir} "
                             "trainer.max_steps=3 optim.lr=1e-4",
                             f"python -m longtrain.trainer.environment {run_dir} --command srun {' '.join(expected)}",
                             "srun start", "srun exit"]
    assert (run_dir / "env" / "launch_command.txt").read_text().split() == ["srun", *expected]
    assert (run_dir / "env" / "sbatch_script.sh").read_text() == SBATCH.read_text()


def test_slurm_processes_per_node_and_overrides(slurm, tmp_path):
    env = {"GPUS_PER_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4", "RECIPE": "moe_balance", "TORCHRUN": "torchrun",
           "TORCHRUN_ARGS": "--max_restarts=2", "MASTER_ADDR": "10.0.0.1"}
    proc = slurm("run.dir=/scratch/mine", "moe.balance.scope=global", **env)
    rc, err = finish(proc)
    assert rc == 0, err
    assert proc.srun_argv()[3:] == ["torchrun", "--nnodes=1", "--nproc_per_node=4", f"--rdzv_id={JOB_ID}", "--rdzv_backend=c10d",
                         "--rdzv_endpoint=10.0.0.1:29500", "--max_restarts=2", "-m", "longtrain.train",
                         "--config-name", "moe_balance", "run.dir=/scratch/mine", "moe.balance.scope=global"]
    rc, err = finish(slurm(GPUS_PER_NODE=""))
    assert rc == 2 and "set GPUS_PER_NODE" in err


def test_slurm_run_dir_survives_requeue(slurm, tmp_path):
    # A requeued job keeps its job id: the same run directory, so checkpoint.resume=auto continues it.
    def run_dirs(proc):
        rc, err = finish(proc)
        assert rc == 0, err
        return [a for a in proc.srun_argv() if a.startswith("run.dir=")], err

    first, _ = run_dirs(slurm())
    stale = tmp_path / f"runs/tiny-{JOB_ID}" / "STOP"
    stale.touch()  # left by an attempt that died before its trainer saw it
    again, err = run_dirs(slurm(SLURM_RESTART_COUNT="1"))
    assert first == again == [f"run.dir={tmp_path}/runs/tiny-{JOB_ID}"]
    assert not stale.exists() and "stale" in err
    assert run_dirs(slurm(SLURM_JOB_ID="4243"))[0] == [f"run.dir={tmp_path}/runs/tiny-4243"]


def test_slurm_bad_input_stops_before_srun(slurm, tmp_path):
    proc = slurm("data.seq_len=x", STUB_BAD_INPUT="data.seq_len: must be a whole number")
    rc, err = finish(proc)
    assert rc == 2 and err.strip().splitlines()[-1] == "longtrain: error: data.seq_len: must be a whole number"
    assert [e.split()[2] for e in proc.events()] == ["longtrain.train"]  # the check alone: no srun, no record
    assert not (tmp_path / f"runs/tiny-{JOB_ID}").exists()


@pytest.mark.parametrize("sig, env, requeued", [
    (signal.SIGUSR1, {}, True),
    (signal.SIGTERM, {}, False),  # scancel: checkpoint, but a requeue would undo the cancel
    (signal.SIGTERM, {"REQUEUE_ON_TERM": "1"}, True),
])
def test_slurm_signal_checkpoints_then_requeues(slurm, tmp_path, sig, env, requeued):
    proc = slurm(SRUN_MODE="trainer", **env)
    deadline = time.monotonic() + 20
    while "srun start" not in proc.events() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    while "srun saw STOP" not in proc.events() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)  # a second signal interrupts `wait` again: the script must keep waiting
    rc, err = finish(proc)
    assert rc == 0, err
    expected = ["srun start", "srun saw STOP", "srun exit"] + ([f"scontrol requeue {JOB_ID}"] if requeued else [])
    assert proc.events()[2:] == expected, err  # after the start-up checks and the environment record
    assert not (tmp_path / f"runs/tiny-{JOB_ID}" / "STOP").exists()


def test_slurm_failures_are_not_requeued(slurm):
    proc = slurm(SRUN_RC="3")
    assert finish(proc)[0] == 3
    assert not any(e.startswith("scontrol requeue") for e in proc.events())
    proc = slurm(SRUN_MODE="trainer", SRUN_RC="1")
    deadline = time.monotonic() + 20
    while "srun start" not in proc.events() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    rc, err = finish(proc)
    assert rc == 1 and "not requeueing" in err
    assert not any(e.startswith("scontrol requeue") for e in proc.events())
