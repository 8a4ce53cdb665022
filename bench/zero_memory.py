"""Per-step time and peak memory of training under each ZeRO mode, and the largest shape that fits.

Each trial trains a few steps of the real trainer (``longtrain.train.run``) in a fresh process on
one device, random-initialised weights on the passkey data, and prints one JSON line: the mode,
the shape, the median step time after the first step, tokens/s, the peak allocated device memory
(``peak_mem_gib``; peak RSS on CPU) and the per-rank memory report (measured next to the ZeRO
paper's formulas). A trial that runs out of memory prints ``"ok": false``.

Modes: ``stage0`` (the plain path: fp32 master weights and AdamW on the device),
``zero2`` (ZeRO-2 through DeepSpeed, one rank: same placement, DeepSpeed's buffers) and
``offload`` (ZeRO-2 with the optimizer state and fp32 master weights in host memory, stepped by
DeepSpeedCPUAdam).

Usage (one H100 80GB):
  python bench/zero_memory.py --shapes llama1b --modes stage0 offload --seq 8192
  python bench/zero_memory.py --shapes llama1b llama8b qwen3_8b --modes offload --seq 8192 --largest
CPU smoke test: python bench/zero_memory.py --shapes tiny --modes stage0 zero2 --seq 256 --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {"stage0": ["zero.stage=0"], "zero2": ["zero.stage=2"],
         "offload": ["zero.stage=2", "zero.offload_optimizer=cpu"]}


def trial(shape: str, mode: str, seq: int, steps: int, device: str) -> dict:
    """Train ``steps`` steps in this process and return the measurements."""
    import statistics

    import torch

    from longtrain.config import register_configs
    from longtrain.train import RECIPES_DIR, run
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    row = {"shape": shape, "mode": mode, "seq": seq, "device": device, "ok": True}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"model.name={shape}", f"data.seq_len={seq}", "data.micro_batch_size=1",
                     "data.global_batch_size=1", "data.mode=pretrain", "data.passkey.num_train=8", "data.passkey.num_eval=0",
                     f"data.passkey.min_chars={seq // 2}", f"data.passkey.max_chars={seq}",
                     f"data.cache_dir={tmp}/cache", f"run.dir={tmp}/run", f"trainer.max_steps={steps}",
                     f"trainer.device={device}", "trainer.eval_every=0", "checkpoint.save_final=false",
                     "logging.progress=false", "memory.checkpointing=true", *MODES[mode]]
        register_configs()
        with initialize_config_dir(config_dir=RECIPES_DIR, version_base=None):
            cfg = OmegaConf.to_object(compose(config_name="tiny", overrides=overrides))
        try:
            run(cfg)
        except torch.OutOfMemoryError:
            row["ok"] = False
            return row
        metrics = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        times = [m["step_time_s"] for m in metrics[1:]] or [metrics[0]["step_time_s"]]
        step_s = statistics.median(times)
        row.update(step_s=round(step_s, 4), tokens_per_s=round(seq / step_s, 1),
                   peak_mem_gib=round(metrics[-1]["peak_mem_gib"], 3), loss=metrics[-1]["loss"])
        report = Path(tmp) / "run" / "memory_report.json"
        if report.is_file():
            row["memory_report"] = json.loads(report.read_text())[0]
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["llama1b"], help="model registry names, smallest first")
    p.add_argument("--modes", nargs="+", default=["stage0", "offload"], choices=sorted(MODES))
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--largest", action="store_true",
                   help="per mode, stop at the first shape that does not fit and report the largest that did")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trial:  # child process: one trial, one JSON line on the last line of stdout
        spec = json.loads(a.trial)
        print(json.dumps(trial(**spec)), flush=True)
        return
    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for mode in a.modes:
        largest = None
        for shape in a.shapes:
            spec = dict(shape=shape, mode=mode, seq=a.seq, steps=a.steps, device=device)
            proc = subprocess.run([sys.executable, __file__, "--trial", json.dumps(spec)], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            try:
                row = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):  # killed (host OOM) or crashed
                row = {**spec, "ok": False, "error": proc.stderr.strip().splitlines()[-1:]}
            print(json.dumps(row), flush=True)
            if row["ok"]:
                largest = shape
            elif a.largest:
                break
        if a.largest:
            print(json.dumps({"mode": mode, "seq": a.seq, "largest_shape_that_trains": largest}), flush=True)


if __name__ == "__main__":
    main()
