"""Record the environment a run started in: ``<run.dir>/env/``.

Written by the writing rank at every start (and by the SLURM batch script before ``srun``), so a
result can be traced to its software, hardware and command line. Files, each rewritten at every
start (``starts.log`` is appended to, one line per start):

- ``environ.txt``: the environment variables that shape a run (``SLURM_*``, ``CUDA*``, ``NCCL*``,
  ``MASTER_*``, ``TORCH*``, ``PYTHON*``, ``PATH`` ...); values of names that look like secrets are
  replaced by ``<redacted>``.
- ``packages.txt``: installed distributions, ``name==version`` (what ``pip freeze`` lists).
- ``versions.json``: Python, torch, CUDA, cuDNN, NCCL, GPUs, host, time.
- ``nvidia-smi.txt``: ``nvidia-smi`` output, when the command exists.
- ``git.txt``: commit, branch, ``git status --short`` and ``git diff --stat`` of the source
  checkout, when it is one.
- ``command.txt``: this process's command line.

Every part is best effort: a part that fails is reported in its file and the others still run.

    python -m longtrain.trainer.environment RUN_DIR    # what launch/slurm.sbatch runs
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

ENV_DIR = "env"
SOURCE_DIR = Path(__file__).resolve().parent.parent.parent  # the checkout longtrain is imported from

# Variables recorded by prefix, and single names; names matching _SECRET have their values hidden.
_ENV_PREFIXES = ("SLURM_", "CUDA", "NCCL_", "NVIDIA_", "MASTER_", "TORCH", "PYTHON", "OMP_", "MKL_", "LD_",
                 "CONDA_", "HYDRA_", "WANDB_", "LONGTRAIN_", "HF_", "GLOO_", "UCX_", "FI_", "TORCHELASTIC_",
                 "PYTORCH_")
_ENV_NAMES = ("PATH", "VIRTUAL_ENV", "HOSTNAME", "USER", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
              "GROUP_RANK", "NODE_RANK", "HOME", "PWD", "TMPDIR")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_TIMEOUT_S = 20


def filtered_environ(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The variables of ``environ`` (default ``os.environ``) worth recording, secrets redacted."""
    environ = os.environ if environ is None else environ
    out = {}
    for name in sorted(environ):
        if name in _ENV_NAMES or name.startswith(_ENV_PREFIXES):
            out[name] = "<redacted>" if _SECRET.search(name) else environ[name]
    return out


def _run(cmd: Sequence[str], cwd: Optional[Path] = None) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    return proc.stdout if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()}\n"


def _packages() -> str:
    names = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            names[name.lower()] = f"{name}=={dist.version}"
    return "".join(line + "\n" for _, line in sorted(names.items()))


def _versions() -> str:
    info: Dict[str, object] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
        "executable": sys.executable,
    }
    import torch  # imported here: the module itself stays cheap to import

    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.backends.cudnn.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for dist in ("longtrain", "deepspeed", "transformers", "datasets", "flash_attn", "hydra-core", "wandb"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return json.dumps(info, indent=1) + "\n"


def _nvidia_smi() -> Optional[str]:
    exe = shutil.which("nvidia-smi")
    return None if exe is None else _run([exe])


def _git(source_dir: Path) -> Optional[str]:
    if shutil.which("git") is None or not (source_dir / ".git").exists():
        return None
    parts = [("commit", ["git", "rev-parse", "HEAD"]), ("branch", ["git", "rev-parse", "--abbrev-ref", "HEAD"]),
             ("status --short", ["git", "status", "--short"]), ("diff --stat HEAD", ["git", "diff", "--stat", "HEAD"])]
    return "".join(f"# {title}\n{_run(cmd, cwd=source_dir)}" for title, cmd in parts)


def dump_environment(run_dir: Union[str, Path], argv: Optional[Sequence[str]] = None,
                     source_dir: Optional[Path] = None) -> List[str]:
    """Write ``<run_dir>/env/`` (see the module docstring) and append a line to ``env/starts.log``.

    Args:
        run_dir: the run directory (created if missing).
        argv: the command line to record; default this process's (``sys.executable`` + ``sys.argv``).
        source_dir: the checkout whose git state is recorded; default the one longtrain runs from.

    Returns:
        The problems met, one line each (empty when every part was written); never raises for a
        failing part, so a run is never stopped by it.
    """
    env_dir = Path(run_dir) / ENV_DIR
    env_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, *sys.argv] if argv is None else list(argv)
    parts: Dict[str, Callable[[], Optional[str]]] = {
        "command.txt": lambda: shlex.join(argv) + "\n",
        "environ.txt": lambda: "".join(f"{k}={v}\n" for k, v in filtered_environ().items()),
        "packages.txt": _packages,
        "versions.json": _versions,
        "nvidia-smi.txt": _nvidia_smi,
        "git.txt": lambda: _git(source_dir or SOURCE_DIR),
    }
    problems = []
    for name, make in parts.items():
        try:
            text = make()
            if text is not None:
                (env_dir / name).write_text(text, encoding="utf-8")
        except Exception as e:  # noqa: BLE001 - recording the environment must never stop a run
            problems.append(f"{name}: {type(e).__name__}: {e}")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    job = os.environ.get("SLURM_JOB_ID", "-")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    try:
        with open(env_dir / "starts.log", "a", encoding="utf-8") as f:
            f.write(f"{stamp} host={socket.gethostname()} slurm_job={job} restart={restarts} "
                    f"cmd={shlex.join(argv)}\n")
    except OSError as e:
        problems.append(f"starts.log: {e}")
    return problems


def main(args: Optional[Sequence[str]] = None) -> int:
    """``python -m longtrain.trainer.environment RUN_DIR [--command CMD...]``: dump, print problems.

    ``--command`` and every argument after it are recorded as the command line instead of this one.
    """
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m longtrain.trainer.environment RUN_DIR [--command CMD ...]", file=sys.stderr)
        return 2
    run_dir, rest = args[0], args[1:]
    argv = rest[1:] if rest[:1] == ["--command"] else None
    for problem in dump_environment(run_dir, argv):
        print(f"longtrain: warning: environment: {problem}", file=sys.stderr)
    print(f"longtrain: environment recorded in {Path(run_dir) / ENV_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
