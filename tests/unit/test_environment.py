"""Environment record (run.dir/env/): contents, secrets hidden, failures only warn, CLI."""
from __future__ import annotations

import json
import logging
import shlex
import subprocess

import torch

from longtrain.train import record_environment
from longtrain.trainer import environment as E


def _git_checkout(path):
    path.mkdir()
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"]):
        (path / "a.py").write_text("x = 1\n")
        subprocess.run(["git", *cmd], cwd=path, check=True, capture_output=True)
    (path / "a.py").write_text("x = 2\n")  # an uncommitted change shows in the diff stat
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def test_dump_environment(tmp_path, monkeypatch):
    for name, value in {"SLURM_JOB_ID": "77", "NCCL_DEBUG": "INFO", "MASTER_PORT": "29500",
                        "WANDB_API_KEY": "s3cret", "HF_TOKEN": "s3cret", "UNRELATED_VAR": "1"}.items():
        monkeypatch.setenv(name, value)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake H100'\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{E.os.environ['PATH']}")
    commit = _git_checkout(tmp_path / "src")
    argv = ["srun", "torchrun", "--nnodes=2", "run.dir=/a b"]
    assert E.dump_environment(tmp_path / "run", argv, source_dir=tmp_path / "src") == []
    env = tmp_path / "run" / "env"
    assert (env / "command.txt").read_text() == "srun torchrun --nnodes=2 'run.dir=/a b'\n"
    environ = (env / "environ.txt").read_text().splitlines()
    assert {"SLURM_JOB_ID=77", "NCCL_DEBUG=INFO", "MASTER_PORT=29500", "WANDB_API_KEY=<redacted>",
            "HF_TOKEN=<redacted>"} <= set(environ)
    assert "s3cret" not in "".join(environ) and not any(line.startswith("UNRELATED_VAR") for line in environ)
    assert any(line.startswith("PATH=") for line in environ)
    assert f"torch=={torch.__version__}" in (env / "packages.txt").read_text().splitlines()
    versions = json.loads((env / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["cuda"] == torch.version.cuda
    assert (env / "nvidia-smi.txt").read_text() == "GPU 0: Fake H100\n"
    git = (env / "git.txt").read_text()
    assert commit in git and "M a.py" in git and "1 file changed" in git
    E.dump_environment(tmp_path / "run", ["again"], source_dir=tmp_path / "src")
    starts = (env / "starts.log").read_text().splitlines()
    assert len(starts) == 2 and "slurm_job=77" in starts[0] and starts[1].endswith("cmd=again")


def test_missing_tools_and_failures_only_warn(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi, no git
    monkeypatch.setattr(E, "_versions", lambda: 1 / 0)
    problems = E.dump_environment(tmp_path / "run", ["x"], source_dir=tmp_path)
    assert problems == ["versions.json: ZeroDivisionError: division by zero"]
    names = sorted(p.name for p in (tmp_path / "run" / "env").iterdir())
    assert names == ["command.txt", "environ.txt", "packages.txt", "starts.log"]
    # In the trainer's start-up a failure is a warning, never an error.
    monkeypatch.setattr(E, "dump_environment", lambda run_dir: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="longtrain"):
        record_environment(str(tmp_path / "run2"))
    assert "environment: not recorded" in caplog.text and "ZeroDivisionError" in caplog.text


def test_command_line(tmp_path, capsys):
    assert E.main([str(tmp_path), "--command", "srun", "-m", "longtrain.train", "optim.lr=1e-3,2e-3"]) == 0
    assert shlex.split((tmp_path / "env" / "command.txt").read_text()) == ["srun", "-m", "longtrain.train",
                                                                          "optim.lr=1e-3,2e-3"]
    assert "environment recorded" in capsys.readouterr().err
    assert E.main([]) == 2
