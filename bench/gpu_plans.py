"""The planner's answers for the GPU suite's measured configurations, computed ahead of the GPU call.

A plan of the 1B shape at 128K tokens takes tens of seconds of CPU, and the suite compares a dozen
of them with the GPU: planned here, before the call, they cost the GPU no time. The suite reads the
file (``--plans``); a configuration missing from it is planned on the GPU machine's CPUs in the
background while the first stages run.

    python bench/gpu_plans.py --out .bench/gpu_plans.json              # h100 and h200, every trial
                                                                       # (the 8B stage's too)
    python bench/gpu_plans.py --dry-run --out /tmp/plans.json          # the dry run's tiny trials

Each entry (key :func:`plan_key`): planned peak GiB, planned step seconds and tokens/s, host GiB, and
the seconds the plan took. One JSON line per plan on stdout as it finishes; the file is rewritten
after each, so an interrupted run keeps what it planned.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from gpu_children import MODES  # noqa: E402


def plan_key(gpu: str, t: dict) -> str:
    """The key of trial ``t`` (shape, layers, mode, seq, chunks) planned for ``gpu``."""
    return f"{gpu}|{t['shape']}|L{t['layers']}|{t['mode']}|{t['seq']}|c{t['streambp_chunk']}|l{t['loss_chunk']}"


def _planned(argv, gpu_name: str) -> dict:
    """The plan of one step of the command line ``argv`` (overrides, ``--config-name``) for ``gpu_name``."""
    from longtrain.config import register_configs
    from longtrain.plan import get_gpu, run_step
    from longtrain.precheck import compose_config

    register_configs()
    cfg = compose_config(argv)
    t0 = time.time()
    plan = run_step(cfg, get_gpu(gpu_name))
    return dict(planned_gib=round(plan.peak_bytes / 2**30, 3), planned_step_s=round(plan.time_s, 3),
                planned_tokens_per_s=round(plan.tokens_per_s), planned_host_gib=round(plan.host_bytes / 2**30, 3),
                planned_bound_by=plan.bound_by, plan_seconds=round(time.time() - t0, 1))


def plan_trial(gpu_name: str, t: dict) -> dict:
    """Plan ``bench/train_step.py``'s step of trial ``t`` for ``gpu_name`` (batch 1, bf16, fused AdamW,
    no clipping, flash attention kernels)."""
    return _planned([f"model.name={t['shape']}", f"model.num_layers={t['layers']}", f"data.seq_len={t['seq']}",
                     "data.micro_batch_size=1", "data.global_batch_size=1",
                     f"trainer.loss_chunk_size={t['loss_chunk']}", "trainer.attention_backend=flash",
                     f"memory.streambp.chunk_size={t['streambp_chunk']}", "optim.clip_grad_norm=0",
                     *MODES[t["mode"]]], gpu_name)


def recipe_key(gpu: str, t: dict) -> str:
    """The key of a recipe trial ``t`` (recipe, depth, length, overrides) planned for ``gpu``."""
    return f"{gpu}|{t['recipe']}|" + "|".join(t["overrides"])


def plan_recipe_trial(gpu_name: str, t: dict) -> dict:
    """Plan one step of recipe trial ``t`` (``bench/gpu_children.py recipe``) for ``gpu_name``."""
    return _planned(["--config-name", t["recipe"], *t["overrides"]], gpu_name)


def main(argv=None) -> int:
    from gpu_stages import eight_b_trials, plan_trials

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file (entries already in it are kept)")
    p.add_argument("--gpus", nargs="+", default=["h100", "h200"])
    p.add_argument("--dry-run", action="store_true", help="the dry run's tiny trials")
    a = p.parse_args(argv)
    out = Path(a.out)
    plans = json.loads(out.read_text()) if out.is_file() else {}
    todo = [(plan_key, plan_trial, t) for t in plan_trials(a.dry_run)]
    todo += [(recipe_key, plan_recipe_trial, t) for t in eight_b_trials(a.dry_run)]
    for gpu in a.gpus:
        for key_of, plan_of, t in todo:
            key = key_of(gpu, t)
            if key in plans:
                continue
            plans[key] = plan_of(gpu, t)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(plans, indent=1))
            print(json.dumps(dict(key=key, **plans[key])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
