"""The global-batch load-balancing experiment: the ``moe_balance`` recipe once per balance scope, at
the same budget (same data, seed, steps and layout), then one JSON line per scope and a comparison.

Per scope it prints::

    {"scope", "eval_loss" (last evaluation), "specialisation" (mean over domains and layers of the
     share of a domain's assignments its top-k experts get; top_k/E = spread evenly, 1 = fixed
     experts), "specialisation_by_domain", "train_maxvio" (global-batch max load / mean load - 1,
     mean over layers and the last 50 steps), "lbl" (same window), "seconds", "run_dir"}

and finally ``{"comparison": true, "eval_loss_global_minus_micro", "specialisation_global_minus_micro"}``.
Every run keeps its run directory (metrics.jsonl, plots/expert_load_step*.png heat maps).

Usage (CPU, ~7 minutes per scope on 2 cores):
  python bench/moe_balance.py --out runs/moe_balance_experiment
  python bench/moe_balance.py --scopes micro_batch global --steps 20 --out /tmp/smoke   # a quick look
Extra arguments after ``--`` are passed to every run as Hydra overrides.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]


def run_scope(scope: str, out: Path, steps: int, overrides: List[str]) -> dict:
    run_dir = out / scope
    cmd = [sys.executable, "-m", "longtrain.train", "--config-name", "moe_balance", f"run.dir={run_dir}",
           f"moe.balance.scope={scope}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
           "checkpoint.resume=none", "checkpoint.save_final=false", "logging.progress=false", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"moe_balance: the {scope} run failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "eval_loss" in r][-1]
    window = [r for r in records if r["step"] > steps - 50] or records[-1:]
    prefix = "eval_moe_specialisation/"
    return {"scope": scope, "eval_loss": last_eval["eval_loss"],
            "specialisation": last_eval["eval_moe_specialisation"],
            "specialisation_by_domain": {k[len(prefix):]: v for k, v in last_eval.items() if k.startswith(prefix)},
            "train_maxvio": sum(r["moe/maxvio"] for r in window) / len(window),
            "lbl": sum(r["moe/lbl"] for r in window) / len(window),
            "seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/moe_balance_experiment"))
    parser.add_argument("--scopes", nargs="+", default=["micro_batch", "global"],
                        choices=["micro_batch", "sequence", "global"])
    parser.add_argument("--steps", type=int, default=300)
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    results = {}
    for scope in args.scopes:
        results[scope] = run_scope(scope, args.out.resolve(), args.steps, overrides)
        print(json.dumps(results[scope]), flush=True)
    if "micro_batch" in results and "global" in results:
        g, m = results["global"], results["micro_batch"]
        print(json.dumps({"comparison": True, "eval_loss_global_minus_micro": g["eval_loss"] - m["eval_loss"],
                          "specialisation_global_minus_micro": g["specialisation"] - m["specialisation"]}))


if __name__ == "__main__":
    main()
