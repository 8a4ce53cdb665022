"""The planner's tables of docs/PLANNING.md: the longest sequence each layout fits on a GPU.

For every row, ``longtrain.plan.cli.max_seq`` finds the longest ``data.seq_len`` (a multiple of 256)
whose planned step fits the GPU, and one more plan at half that length gives the marginal GPU
memory per token of context (``(peak(L) - peak(L/2)) / (L/2)``: what one more token costs, the
fixed model state and chunk working sets left out). One JSON line per row: the row's name and
overrides, the GPU, ``max_seq``, the peak at that length, bytes per token (peak / tokens this rank
holds), the marginal bytes per token, host memory, tokens/s and MFU by the planner's clock with
what bounds the step (``bound_by``, ``time_breakdown``), and the seconds the search took on this
machine. Everything is a prediction (docs/PLANNING.md says where it is blind).

Usage:
  python bench/plan_tables.py                     # every row (tens of minutes on 2 CPU cores)
  python bench/plan_tables.py --rows 1b-h200-streambp-offload
  python bench/plan_tables.py --dry-run           # the tiny model on a 24 MiB GPU: seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Dict, List, Tuple

ONE_SEQ = ["data.micro_batch_size=1", "data.global_batch_size=1"]
CKPT = ["memory.checkpointing=true"]
SBP = ["memory.streambp.enabled=true"]
SBP_OFF = SBP + ["memory.offload_checkpoints=true"]

ROWS: Dict[str, Tuple[str, List[str], str, int]] = {
    # name: (model, overrides, gpu, world size)
    "1b-h100-checkpointing": ("llama1b", CKPT, "h100", 1),
    "1b-h100-streambp": ("llama1b", SBP, "h100", 1),
    "1b-h100-streambp-offload": ("llama1b", SBP_OFF, "h100", 1),
    "1b-h200-checkpointing": ("llama1b", CKPT, "h200", 1),
    "1b-h200-streambp": ("llama1b", SBP, "h200", 1),
    "1b-h200-streambp-offload": ("llama1b", SBP_OFF, "h200", 1),
    # Llama-3.1-8B on one H100 needs the optimizer in host memory (16 bytes per parameter = 120 GiB)
    "8b-1xh100-zero2-offload-streambp-offload": ("llama8b", ["zero.stage=2", "zero.offload_optimizer=cpu"] + SBP_OFF,
                                                 "h100", 1),
    # ...or the parameters and the optimizer both there (ZeRO-3 Offload): the GPU holds a layer's gathered ones
    "8b-1xh100-zero3-offload-all-streambp-offload": ("llama8b", ["zero.stage=3", "zero.offload_optimizer=cpu",
                                                                 "zero.offload_params=cpu"] + SBP_OFF, "h100", 1),
    "8b-8xh100-u8-zero3-streambp-offload": ("llama8b", ["parallel.sp.ulysses=8", "zero.stage=3"] + SBP_OFF, "h100", 8),
    "8b-8xh100-u8-zero3-checkpointing": ("llama8b", ["parallel.sp.ulysses=8", "zero.stage=3"] + CKPT, "h100", 8),
}


def run_row(name: str, model: str, overrides: List[str], gpu_name: str, world_size: int, gpu=None) -> dict:
    from longtrain.config import register_configs
    from longtrain.plan import get_gpu
    from longtrain.plan.cli import SEQ_MULTIPLE, max_seq, with_seq
    from longtrain.plan.length import plan_step
    from longtrain.precheck import compose_config

    register_configs()
    argv = [f"model.name={model}", *ONE_SEQ, *overrides]
    cfg = compose_config(argv)
    gpu = gpu or get_gpu(gpu_name)
    start = time.perf_counter()
    longest, plan = max_seq(cfg, gpu, world_size)
    out = {"row": name, "overrides": argv, "gpu": gpu.name, "world_size": world_size, "max_seq": longest}
    if plan is None:
        return {**out, "fits": False}
    half = max(SEQ_MULTIPLE, longest // 2 // SEQ_MULTIPLE * SEQ_MULTIPLE)
    shorter = plan_step(with_seq(cfg, half), gpu, world_size=world_size)
    local = (longest - half) / plan.sp
    out.update(peak_gib=plan.peak_bytes / 2**30, bytes_per_token=plan.bytes_per_token,
               marginal_bytes_per_token=(plan.peak_bytes - shorter.peak_bytes) / local if local else None,
               host_gib=plan.host_bytes / 2**30, tokens_per_s=plan.tokens_per_s, mfu=plan.mfu,
               bound_by=plan.bound_by, time_breakdown=plan.time_breakdown,
               streambp_chunk=plan.streambp_chunk, peak_phase=plan.peak_phase,
               peak_tensors=plan.peak_tensors[:6], depth_probes=plan.depth_probes,
               seconds=time.perf_counter() - start)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS), help="rows to plan")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on a 24 MiB GPU (seconds)")
    args = parser.parse_args(argv)
    if args.dry_run:
        from longtrain.plan import get_gpu

        h100 = get_gpu("h100")
        small = dataclasses.replace(h100, name="h100-24MiB", memory_bytes=24 << 20)
        row = run_row("tiny-streambp-offload", "tiny", SBP_OFF + ["memory.streambp.chunk_size=1024"], "h100", 1, small)
        print(json.dumps(row), flush=True)
        return 0
    for name in args.rows:
        print(json.dumps(run_row(name, *ROWS[name])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
