"""StreamBP against gradient checkpointing and the HF baseline, side by side in one run on one GPU.

Runs ``bench/train_step.py`` (longtrain: ``streambp``, ``streambp_offload``, ``checkpointing``) and
the baseline script given by ``--baseline`` (HF transformers + SDPA + checkpointing: ``hf``, and
with Liger's fused loss: ``liger``) one after the other, each doubling the sequence length until
it runs out of memory, and prints every trial's JSON line, then one summary line per mode:

    {"summary": true, "mode", "max_seq" (longest length that ran), "gib_per_1k_tokens" (peak-memory
     slope between the two longest lengths that ran), "step_s_32k", "step_s_128k"}

and a final line with the targets of the StreamBP issue: ``max_seq_vs_liger`` (StreamBP's longest
length over the Liger baseline's; target >= 4) and ``step_time_vs_checkpointing_32k`` (StreamBP's
step time at 32K over longtrain's checkpointing; target <= 1).

All runs: Llama-3.2-1B shape, bf16, batch 1, forward + backward + AdamW step, random weights.

Usage (GPU machine; the baseline script must be reachable there, e.g. copied into the checkout):
  python bench/streambp_compare.py --baseline path/to/hf_baseline.py --start 8192 --max 4194304
CPU smoke test (no baseline, tiny shape):
  python bench/streambp_compare.py --shape tiny --start 256 --max 512 --streambp-chunk 100
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent


def run_json_lines(cmd: List[str]) -> List[dict]:
    """Run ``cmd``, echo its JSON lines as they come, return them parsed."""
    rows = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                print(line, flush=True)
                rows.append(json.loads(line))
    return rows


def summarise(mode: str, rows: List[dict]) -> dict:
    ok = sorted((r for r in rows if r.get("mode") == mode and r.get("ok")), key=lambda r: r["seq"])
    out: Dict[str, Optional[float]] = dict(summary=True, mode=mode, max_seq=ok[-1]["seq"] if ok else None,
                                           gib_per_1k_tokens=None, step_s_32k=None, step_s_128k=None)
    if len(ok) >= 2 and ok[-1].get("peak_gib") is not None and ok[-2].get("peak_gib") is not None:
        out["gib_per_1k_tokens"] = round((ok[-1]["peak_gib"] - ok[-2]["peak_gib"]) * 1024
                                         / (ok[-1]["seq"] - ok[-2]["seq"]), 4)
    for r in ok:
        if r["seq"] == 32768:
            out["step_s_32k"] = r["step_s"]
        if r["seq"] == 131072:
            out["step_s_128k"] = r["step_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama1b")
    p.add_argument("--baseline", help="path to the HF baseline script (skipped when not given)")
    p.add_argument("--start", type=int, default=8192)
    p.add_argument("--max", type=int, default=1 << 22)
    p.add_argument("--streambp-chunk", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=400, help="per script: stop starting new trials after this")
    a = p.parse_args()
    common = ["--start", str(a.start), "--max", str(a.max), "--repeats", str(a.repeats), "--budget-s", str(a.budget_s)]
    modes = ["streambp", "streambp_offload", "checkpointing"]
    rows = run_json_lines([sys.executable, str(HERE / "train_step.py"), "--shape", a.shape, "--modes", *modes,
                           "--streambp-chunk", str(a.streambp_chunk), *common])
    if a.baseline:
        modes += ["hf", "liger"]
        rows += run_json_lines([sys.executable, a.baseline, "--shape", a.shape, "--modes", "hf", "liger",
                                "--optimizer", *common])
    summaries = {m: summarise(m, rows) for m in modes}
    for s in summaries.values():
        print(json.dumps(s), flush=True)
    stream, liger, ckpt = summaries["streambp"], summaries.get("liger"), summaries["checkpointing"]
    print(json.dumps(dict(
        targets=True,
        max_seq_vs_liger=None if not liger or not liger["max_seq"] or not stream["max_seq"]
        else round(stream["max_seq"] / liger["max_seq"], 2),
        step_time_vs_checkpointing_32k=None if not stream["step_s_32k"] or not ckpt["step_s_32k"]
        else round(stream["step_s_32k"] / ckpt["step_s_32k"], 3))), flush=True)


if __name__ == "__main__":
    main()
