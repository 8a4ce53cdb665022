"""The planner against the GPU: planned peak memory next to ``torch.cuda.max_memory_allocated()``.

For each configuration of ``bench/train_step.py`` (shape, memory mode, sequence length; batch 1,
bf16 autocast, fused AdamW, StreamBP chunk and LM-head chunk as that script sets them) it plans the
step with ``longtrain.plan.run_step`` for the GPU this machine has, then runs
``bench/train_step.py`` for the same configuration in a child process and reads its measured peak.
One JSON line per configuration: planned and measured GiB, their ratio (target: within 5%), the
planned roofline and measured tokens/s.

Usage (one H100 or H200; deepspeed, hydra and the rest of longtrain's requirements installed):
  python bench/plan_check.py --shape llama1b --seqs 16384 65536 --modes checkpointing streambp streambp_offload
CPU dry run (plans only, no measurement, tiny shape): python bench/plan_check.py --dry-run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {"checkpointing": ["memory.checkpointing=true"], "streambp": ["memory.streambp.enabled=true"],
         "streambp_offload": ["memory.streambp.enabled=true", "memory.offload_checkpoints=true"], "none": []}


def planned(shape: str, mode: str, seq: int, gpu, streambp_chunk: int, loss_chunk: int):
    from longtrain.config import register_configs
    from longtrain.plan import run_step
    from longtrain.precheck import compose_config

    register_configs()
    cfg = compose_config([f"model.name={shape}", f"data.seq_len={seq}", "data.micro_batch_size=1",
                          "data.global_batch_size=1", f"trainer.loss_chunk_size={loss_chunk}",
                          f"memory.streambp.chunk_size={streambp_chunk}", "optim.clip_grad_norm=0", *MODES[mode]])
    return run_step(cfg, gpu)


def measured(shape: str, mode: str, seq: int, streambp_chunk: int, loss_chunk: int) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), "--shape", shape, "--modes", mode, "--start", str(seq),
           "--max", str(seq), "--streambp-chunk", str(streambp_chunk), "--loss-chunk", str(loss_chunk)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return rows[-1] if rows else {"ok": False, "error": out.stderr[-500:]}


def this_gpu():
    import torch

    from longtrain.plan import get_gpu

    name = torch.cuda.get_device_name(0).lower()
    return get_gpu("h200" if "h200" in name else "b200" if "b200" in name else "a100" if "a100" in name else "h100")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama1b")
    p.add_argument("--modes", nargs="+", default=list(MODES)[:3], choices=list(MODES))
    p.add_argument("--seqs", nargs="+", type=int, default=[16384, 65536])
    p.add_argument("--streambp-chunk", type=int, default=4096)
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--dry-run", action="store_true", help="tiny shape, plans only (no GPU needed)")
    a = p.parse_args(argv)
    if a.dry_run:
        from longtrain.plan import get_gpu

        a.shape, a.seqs, a.streambp_chunk, a.loss_chunk, gpu = "tiny", [512], 128, 256, get_gpu("h100")
    else:
        gpu = this_gpu()
    for mode in a.modes:
        for seq in a.seqs:
            plan = planned(a.shape, mode, seq, gpu, a.streambp_chunk, a.loss_chunk)
            row = {"shape": a.shape, "mode": mode, "seq": seq, "gpu": gpu.name, "planned_gib": plan.peak_bytes / 2**30,
                   "planned_tokens_per_s": plan.tokens_per_s}
            if not a.dry_run:
                got = measured(a.shape, mode, seq, a.streambp_chunk, a.loss_chunk)
                row.update(measured_gib=got.get("peak_gib"), measured_tokens_per_s=got.get("tokens_per_s"),
                           ok=got.get("ok", False))
                if got.get("peak_gib"):
                    row["planned_over_measured"] = row["planned_gib"] / got["peak_gib"]
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
