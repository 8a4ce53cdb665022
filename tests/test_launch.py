"""launch/run.sh: the torchrun command line it builds (torchrun stubbed with echo)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
