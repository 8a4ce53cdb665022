"""Run parity tests under each of ATen's CPU kernel paths and tabulate how close each comparison came
to its tolerance (tests/support/parity.py): the audit of docs/COMPOSITION.md.

ATen picks its vectorised kernels (reductions, softmax, elementwise ops) by the CPU's capability, and
``ATEN_CPU_CAPABILITY`` lowers it: ``default`` (no vector ISA), ``avx2``, ``avx512``. Sums then round
differently, so a tolerance tuned to one machine's rounding shows up as a margin near or above 1 on
another path. Paths the CPU lacks are reported as skipped.

    python bench/parity_margins.py                                  # the default suite's parity tests
    python bench/parity_margins.py --caps default,avx2 -- -m slow tests/distributed/test_matrix.py

Prints one JSON object: per capability the pytest outcome (return code, summary line, failed tests)
and per test the worst margin of each kind of comparison (``step1``, ``later``, ``grads``,
``tensors``, ``exact``; 1.0 is the edge of the tolerance), then the worst of each kind over all
capabilities with the test it came from.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
CAPS = ("default", "avx2", "avx512")
PARITY = ["-m", "not slow and not gpu", "tests/distributed/test_matrix.py", "tests/distributed/test_moe_balance.py",
          "tests/distributed/test_zero.py", "tests/distributed/test_streambp_train.py",
          "tests/distributed/test_sp_train.py", "tests/distributed/test_train.py"]
"""The parity tests of the default suite (every module that compares a layout with one process)."""


def capability(cap: str) -> str:
    """The capability torch reports under ``ATEN_CPU_CAPABILITY=cap`` (it falls back where the CPU lacks it)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env={**os.environ, "ATEN_CPU_CAPABILITY": cap}, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def summarise(log: Path) -> Dict[str, Dict[str, float]]:
    """Worst margin per test and kind from a LONGTRAIN_PARITY_LOG file."""
    tests: Dict[str, Dict[str, float]] = {}
    if not log.exists():
        return tests
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        kinds = tests.setdefault(rec["test"], {})
        kinds[rec["kind"]] = max(kinds.get(rec["kind"], 0.0), rec["margin"])
    return tests


def run_cap(cap: str, pytest_args: List[str], timeout: float) -> dict:
    got = capability(cap)
    if got.lower() != cap.lower():
        return {"skipped": f"the CPU lacks {cap} (torch runs {got})"}
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        log = Path(tmp) / "margins.jsonl"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "LONGTRAIN_PARITY_LOG": str(log), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *pytest_args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        lines = proc.stdout.strip().splitlines()
        return {"capability": got, "returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
                "failed": [m.group(1) for m in re.finditer(r"^FAILED (\S+)", proc.stdout, re.M)],
                "tests": summarise(log)}


def worst_over(results: Dict[str, dict]) -> Dict[str, dict]:
    """The largest margin of each kind over every capability, with where it came from (planted errors,
    which must fail, are left out)."""
    worst: Dict[str, dict] = {}
    for cap, res in results.items():
        for test, kinds in res.get("tests", {}).items():
            if "planted" in test:
                continue
            for kind, margin in kinds.items():
                if margin > worst.get(kind, {}).get("margin", -1.0):
                    worst[kind] = {"margin": margin, "test": test, "capability": cap}
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", default=",".join(CAPS), help="comma-separated ATEN_CPU_CAPABILITY values")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per capability")
    parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs (default: the parity tests)")
    args = parser.parse_args(argv)
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    bad = [c for c in caps if c not in CAPS]
    if bad:
        parser.error(f"--caps: unknown capability {bad[0]!r}; choose from {', '.join(CAPS)}")
    results = {cap: run_cap(cap, args.pytest_args or PARITY, args.timeout) for cap in caps}
    print(json.dumps({"results": results, "worst": worst_over(results)}, indent=1))
    return 0 if all(r.get("returncode", 0) == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
