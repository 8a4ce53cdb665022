"""Does the default recipe learn long-context retrieval? Train a recipe with ``launch/run.sh`` and
print one JSON object: passkey accuracy by depth at the training length, the needle grid at every
length the recipe evaluates, the wall time of the whole command and the machine's load.

    python bench/passkey_learning.py                                  # tiny: 2 processes, CPU
    python bench/passkey_learning.py --recipe tiny_sp                 # the same task at 4x, Ulysses over 2 ranks
    python bench/passkey_learning.py --dry-run                        # a few steps, to check the plumbing

The run directory (``--run-dir``, default ``runs/bench-<recipe>-<time>``) keeps the metrics, the
needle grid and the plots. Extra arguments are Hydra overrides passed to the recipe. The timing is
the wall clock of ``launch/run.sh`` (start-up, data, training, evaluation, plots); the load average
before and after is reported because a shared machine slows every number down.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRY_RUN = ["trainer.max_steps=4", "trainer.eval_every=2", "data.passkey.num_train=64", "data.passkey.num_eval=5",
           "data.passkey.grid_samples=1", "data.passkey.grid_lengths=[1,2]", "data.seq_len=512",
           "data.passkey.max_chars=400", "checkpoint.every=0"]
"""Overrides of ``--dry-run``: a few steps on short rows, enough to exercise every piece once."""


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--dry-run", action="store_true", help="a few steps on short rows (tests the plumbing)")
    args, overrides = parser.parse_known_args(argv)
    run_dir = Path(args.run_dir or REPO / "runs" / f"bench-{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = (DRY_RUN if args.dry_run else []) + list(overrides) + [f"run.dir={run_dir}", "logging.progress=false"]
    cmd = ["bash", str(REPO / "launch" / "run.sh"), "--nproc", str(args.nproc), "--recipe", args.recipe, *overrides]
    load_before = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = next((r for r in reversed(records) if "passkey_acc" in r), {})
    needle = json.loads((run_dir / "needle.json").read_text()) if (run_dir / "needle.json").is_file() else None
    steps = [r for r in records if "tokens_per_s" in r]
    result = {
        "recipe": args.recipe, "nproc": args.nproc, "overrides": overrides[:-2], "run_dir": str(run_dir),
        "steps": last_eval.get("step"), "wall_s": round(wall, 1),
        "train_s": round(sum(r["step_time_s"] for r in steps), 1) if steps else None,
        "passkey_acc": last_eval.get("passkey_acc"), "passkey_digit_acc": last_eval.get("passkey_digit_acc"),
        "passkey_acc_by_depth": {k[len("passkey_acc_depth_"):]: v for k, v in last_eval.items()
                                 if k.startswith("passkey_acc_depth_")},
        "eval_loss": last_eval.get("eval_loss"),
        "needle": None if needle is None else {"lengths": needle["lengths"], "depths": needle["depths"],
                                               "acc": needle["acc"], "overall": needle["overall"]},
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in steps) / len(steps)) if steps else None,
        "peak_mem_gib": max((r["peak_mem_gib"] for r in steps), default=None),
        "load_before": load_before, "load_after": load_average(), "cpus": os.cpu_count(), "host": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
