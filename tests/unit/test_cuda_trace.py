"""bench/cuda_trace.py refuses a torch without CUDA support in one line (the script itself needs the
CUDA build of torch and is run by hand, not in CI)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build: the script would run")
def test_refuses_a_cpu_torch_naming_the_cuda_venv():
    proc = subprocess.run([sys.executable, "bench/cuda_trace.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "CUDA build of torch" in lines[0] and "cuda-venv/bin/python" in lines[0], lines
