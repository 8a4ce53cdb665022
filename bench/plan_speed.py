"""How long the planner takes on this machine: the targets of docs/PLANNING.md ("How fast it plans").

Each case runs in its own process (imports and DeepSpeed's first use included, as a user would run
``longtrain-plan``) and prints one JSON line: the case, its command line, the wall seconds, the
target, and what the plan said (fits, peak GiB per GPU, the depths it probed, the longest sequence
for ``--max-seq``, the rows of ``--sweep``).

Usage:
  python bench/plan_speed.py                    # the three timed plans (about 4 minutes on 2 cores)
  python bench/plan_speed.py --cases 1b-1m
  python bench/plan_speed.py --cases 8b-8rank-sweep-128k   # about 20 minutes on 2 cores
  python bench/plan_speed.py --dry-run          # the tiny model: seconds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

ONE_SEQ = ["data.micro_batch_size=1", "data.global_batch_size=1"]
EIGHT_SEQ = ["data.micro_batch_size=1", "data.global_batch_size=8"]  # a sweep's dp reaches 8: one sequence each
SBP_OFF = ["memory.streambp.enabled=true", "memory.offload_checkpoints=true"]
U8_Z3 = ["--world-size", "8", "parallel.sp.ulysses=8", "zero.stage=3"]

CASES: Dict[str, Tuple[List[str], Optional[float]]] = {
    # name: (longtrain-plan arguments, target seconds on a 2-core CPU)
    "8b-8rank-1m": (["model.name=llama8b", "data.seq_len=1048576", *U8_Z3, *SBP_OFF], 60.0),
    "1b-1m": (["model.name=llama1b", "data.seq_len=1048576", *SBP_OFF], 30.0),
    "8b-8rank-max-seq": (["model.name=llama8b", "data.seq_len=131072", "--max-seq", *U8_Z3, *SBP_OFF], 300.0),
    "8b-8rank-sweep-128k": (["model.name=llama8b", "data.seq_len=131072", "--sweep", "--world-size", "8"], None),
    "1b-8rank-sweep-128k": (["model.name=llama1b", "data.seq_len=131072", "--sweep", "--world-size", "8"], None),
}
DRY = {"tiny-1k": (["model.name=tiny", "data.seq_len=1024", *SBP_OFF], None)}


def run_case(name: str, args: List[str], target: Optional[float]) -> dict:
    batch = EIGHT_SEQ if "--sweep" in args else ONE_SEQ
    cmd = [sys.executable, "-m", "longtrain.plan", "--gpu", "h100", "--json", *batch, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    out = {"case": name, "args": args, "seconds": round(seconds, 1), "target_s": target,
           "within_target": None if target is None else seconds < target, "rc": proc.returncode}
    if proc.returncode != 0:
        return {**out, "error": proc.stderr.strip().splitlines()[-1:] if proc.stderr else []}
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    if "rows" in answer:
        rows = answer["rows"]
        out.update(layouts=len(rows), fitting=sum(r["fits"] for r in rows),
                   refused=sum(bool(r["error"]) for r in rows),
                   state_alone_too_big=sum(r["floor_bytes"] is not None and not r["exceeds"] for r in rows),
                   left_out_faster_fits=sum(bool(r["faster_fits"]) for r in rows),
                   left_out_holds_more=sum(bool(r["exceeds"]) for r in rows),
                   planned=sum(r["plan"] is not None for r in rows),
                   fastest=next(({k: r[k] for k in ("ulysses", "ring", "dp", "zero_stage", "memory")}
                                 for r in rows if r["fits"]), None))
        return out
    plan = answer["plan"]
    out.update(fits=answer["fits"], peak_gib=round(plan["peak_bytes"] / 2**30, 2),
               host_gib=round(plan["host_bytes"] / 2**30, 2), depth_probes=plan["depth_probes"],
               seq_probes=plan.get("seq_probes"))
    if "max_seq" in answer:
        out["max_seq"] = answer["max_seq"]
        out["max_seq_peak_gib"] = round(answer["max_seq_plan"]["peak_bytes"] / 2**30, 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=[c for c in CASES if "sweep" not in c], choices=list(CASES),
                        help="cases to time (default: all but the sweeps)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model only (seconds)")
    args = parser.parse_args(argv)
    cases = DRY if args.dry_run else {name: CASES[name] for name in args.cases}
    for name, (case_args, target) in cases.items():
        print(json.dumps(run_case(name, case_args, target)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
