"""One GPU call that proves longtrain on CUDA: stages in order of value, each in its own processes
with its share of one budget, every result written as it comes.

1. ``smoke``: the trainer itself on CUDA, bf16, the Llama-3.2-1B shape at 16K tokens: every memory
   mode (plain, checkpointing, StreamBP, StreamBP + offload) on both attention backends (flash,
   cuDNN) trains 3 steps from the same seed and data, and their losses and gradient norms agree.
2. ``plan``: the planner against ``max_memory_allocated`` and the step time, at full depth at 32K and
   128K per mode, and for StreamBP + offload at reduced depth (2 and 4 layers of the 1B width) at
   256K, 512K and 1M; the peak's change with depth, planned against measured. The plans come from
   ``--plans`` (computed before the call by ``bench/gpu_plans.py``); missing ones are planned on this
   machine's CPUs in the background. Weights are made on the GPU.
3. ``speed``: tokens/s of HF + gradient checkpointing + Liger's fused loss (the baseline script's own
   trial) at the lengths of stage 2, next to each longtrain mode measured there: ratios and MFU.
4. ``kernels``: attention forward + backward (SDPA, local attention, the block kernels; flash and
   cuDNN), each row checked against SDPA; the sequence-parallel decomposition, checked against the
   unsplit kernel.
5. ``pytest_gpu`` (``pytest -m gpu``; a block that fell back to the reference although a fused
   executor takes its dtype fails its test), ``moe`` (grouped GEMM), ``zero_offload`` (ZeRO-2
   optimizer offload on the 1B shape; on 8B only when the host has the memory).
6. ``eight_b``: the ``llama8b_1gpu`` recipe's layout (Llama-3.1-8B, ZeRO-3 with parameters and
   optimizer on the host, StreamBP + offload) through the trainer at 2 and 4 of its 32 layers at 256K
   tokens, then 2 layers at 512K and 1M, one step each: planned against measured peak; a trial is
   skipped where the host lacks the memory its plan needs (the plans come with ``--plans``).

Tolerances and targets: bench/gpu_stages.py. Budget: ``--budget`` seconds (default 480) in all;
each stage gets its share (``SHARES``) plus what earlier stages left, and one with less than its
minimum left is recorded as skipped with the reason. Outputs, rewritten after every stage so that
a cut call keeps what it measured, and nothing else written outside a temporary directory:
``<out>/gpu_suite.json``, ``<out>/gpu_suite.md``, ``<out>/suite.log``.

On the GPU machine (docs/BENCHMARKS.md gives the whole call, wheels included):
  python3 bench/gpu_suite.py --out "$OUT/gpu" --budget 480 --baseline .bench/hf_baseline.py --plans .bench/gpu_plans.json
CPU dry run (tiny shapes, the same stages in the same order, ~1 minute; part of the default tests):
  python bench/gpu_suite.py --device cpu --dry-run --out /tmp/gpu_suite_dry
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from gpu_report import markdown, targets  # noqa: E402
from gpu_stages import MIN_S, PEAK_FLOPS, SHARES, STAGES, child_env  # noqa: E402

OUTPUTS = ("gpu_suite.json", "gpu_suite.md", "suite.log")


def find_baseline(given: Optional[str]) -> Optional[Path]:
    candidates = [given] if given else [".bench/hf_baseline.py", "../shared/bench/hf_baseline.py"]
    for c in candidates:
        p = Path(c) if os.path.isabs(c) else (REPO / c).resolve()
        if p.is_file():
            return p
    return None


def planner_gpu(device_name: str) -> str:
    name = device_name.lower()
    return "h200" if "h200" in name else "b200" if "b200" in name else "a100" if "a100" in name else "h100"


class Background:
    """Work started with the suite that later stages wait for: DeepSpeed's CPU Adam build (CUDA only)
    and the plans ``--plans`` lacks (planned into the scratch directory)."""

    def __init__(self, a, gpu: str, scratch: Path) -> None:
        self.t0, self.procs, self.scratch = time.time(), {}, scratch
        self.given = json.loads(Path(a.plans).read_text()) if a.plans and Path(a.plans).is_file() else {}
        self.planned = scratch / "plans.json"
        self.planned.write_text(json.dumps(self.given))
        cmd = [sys.executable, str(REPO / "bench" / "gpu_plans.py"), "--out", str(self.planned), "--gpus", gpu]
        self._start("plans", cmd + (["--dry-run"] if a.dry_run else []), {})
        if a.device == "cuda" and {"zero_offload", "eight_b"} & set(a.stages):
            code = ("from deepspeed.accelerator import get_accelerator; "
                    "get_accelerator().create_op_builder('CPUAdamBuilder').load()")
            self._start("cpu_adam", [sys.executable, "-c", code], {"DS_ACCELERATOR": "cuda"})

    def _start(self, name: str, cmd: List[str], env: dict) -> None:
        log = open(self.scratch / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env=child_env(env), start_new_session=True)

    def wait(self, name: str, timeout: float) -> Optional[int]:
        proc = self.procs.get(name)
        if proc is None:
            return None
        try:
            proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            pass
        return proc.poll()

    def plans(self, wait: bool = False, timeout: float = 60) -> dict:
        if wait:
            self.wait("plans", timeout)
        try:
            return {**self.given, **json.loads(self.planned.read_text())}
        except (OSError, json.JSONDecodeError):  # being rewritten: what --plans gave
            return dict(self.given)

    def cpu_adam(self, timeout: float = 120) -> dict:
        rc = self.wait("cpu_adam", timeout)
        return {} if "cpu_adam" not in self.procs else dict(cpu_adam_build_rc=rc,
                                                            cpu_adam_build_s=round(time.time() - self.t0, 1))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help=f"output folder ({', '.join(OUTPUTS)}; nothing else)")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole suite")
    p.add_argument("--baseline", help="the HF baseline script (default: .bench/ or ../shared/bench/hf_baseline.py)")
    p.add_argument("--plans", help="plans of the measured configurations (bench/gpu_plans.py)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes: every stage's plumbing")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    a = p.parse_args(argv)
    a.shape = "tiny" if a.dry_run else "llama1b"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1" if a.device == "cpu" else "8")
    t_start, device_name = time.time(), "cpu"
    if a.device == "cuda":  # asked in a child: this process holds no CUDA context while the stages run
        probe = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available(); "
                                "print(torch.cuda.get_device_name(0))"], capture_output=True, text=True)
        if probe.returncode != 0:
            p.error("--device cuda: no CUDA device here (use --device cpu --dry-run for the plumbing)")
        device_name = probe.stdout.strip().splitlines()[-1]
    gpu = planner_gpu(device_name)
    result = dict(meta=dict(command=" ".join(["python", "bench/gpu_suite.py", *(argv or sys.argv[1:])]),
                            device=a.device, device_name=device_name, planner_gpu=gpu, dry_run=a.dry_run,
                            budget_s=a.budget, elapsed_s=0, peak_flops=PEAK_FLOPS,
                            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
                  stages={}, targets={})
    scratch = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    background = Background(a, gpu, scratch)
    ctx = dict(gpu=gpu, scratch=scratch, plans=background.plans, cpu_adam=background.cpu_adam,
               baseline=find_baseline(a.baseline))
    chosen = [s for s in STAGES if s in a.stages]
    total = sum(SHARES[s] for s in chosen)
    try:
        with open(out / "suite.log", "a") as log:
            for i, name in enumerate(chosen):
                later = sum(SHARES[s] for s in chosen[i + 1:]) / total * a.budget
                timeout = a.budget - (time.time() - t_start) - later
                minimum = 3 if a.dry_run else MIN_S[name]
                log.write(f"==== {name}: {timeout:.0f} s\n")
                log.flush()
                if timeout < minimum:
                    stage = dict(ok=None, skipped=f"budget: {max(0, timeout):.0f} s left for it, needs {minimum} s")
                else:
                    t0 = time.time()
                    try:
                        stage = STAGES[name](a, timeout, log, ctx)
                    except Exception as exc:  # noqa: BLE001 - a bug in one stage must not lose the others
                        stage = dict(ok=False, error=f"{type(exc).__name__}: {exc}")
                    stage.update(seconds=round(time.time() - t0, 1), timeout_s=round(timeout, 1))
                result["stages"][name] = stage
                result["targets"] = targets(result["stages"])
                result["meta"]["elapsed_s"] = round(time.time() - t_start, 1)
                (out / "gpu_suite.json").write_text(json.dumps(result, indent=1, default=str))
                (out / "gpu_suite.md").write_text(markdown(result))
                print(json.dumps(dict(stage=name, ok=stage.get("ok"), seconds=stage.get("seconds"),
                                      skipped=stage.get("skipped"))), flush=True)
    finally:
        background.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    failed = [n for n, s in result["stages"].items() if s.get("ok") is False]
    print(f"gpu_suite: {len(result['stages']) - len(failed)} stages ok or skipped, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; {out / 'gpu_suite.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
