"""The stages of the GPU suite (bench/gpu_suite.py), most valuable first. Each stage runs its work in
child processes (bench/gpu_children.py, the bench scripts) with its share of the budget and returns
one dict: ``ok`` (None: skipped), what it measured, and the checks it made against stated targets.

Tolerances and targets:

- smoke: every memory mode and attention backend trains from the same weights and data; losses
  within :data:`SMOKE_LOSS_RTOL` and gradient norms within :data:`SMOKE_GRAD_RTOL` of the plain
  flash run at every step. bf16 keeps 8 bits of mantissa (2e-3 relative per rounding); the loss is
  an fp32 mean over every token, so rounding averages out, while the gradient norm sums squares of
  bf16 gradients that each mode accumulates in another order (chunks, recomputation, kernels).
- plan: planned peak within 5% of ``max_memory_allocated``, step time within 25%, and the change
  of the peak from 2 to 4 layers within 5% of the measured change (depth links the reduced-depth
  points to the full model).
- speed: tokens/s of each longtrain mode over HF + checkpointing + Liger's fused loss >= 1.4 at 32K
  and 128K, measured in the same call; MFU on 989 TFLOP/s.
- kernels: every attention row within 2e-2 of SDPA (out, dq, dk, dv: max error over max magnitude
  + 1), every decomposition within 2e-2 of the unsplit kernel.
- eight_b: the 8B one-GPU layout at reduced depth, planned peak within 5% of the trainer's
  ``max_memory_allocated`` (one step); a trial whose planned host memory the host lacks is skipped.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PEAK_FLOPS = 989e12  # dense bf16 of an H100/H200 SXM, for MFU
SMOKE_LOSS_RTOL, SMOKE_GRAD_RTOL = 1e-2, 5e-2
PLAN_PEAK_RTOL, PLAN_TIME_RTOL = 0.05, 0.25
SPEED_TARGET = 1.4
FULL_MODES = ("checkpointing", "streambp", "streambp_offload")


def child_env(extra: Optional[dict] = None) -> dict:
    path = [str(REPO), str(BENCH), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **(extra or {})}


def run_lines(cmd: List[str], timeout: float, log, env: Optional[dict] = None) -> dict:
    """Run ``cmd`` for at most ``timeout`` s; its JSON lines (kept even when it is killed), rc, tail."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        timed_out = True
    rows, tail = [], []
    for line in (out or "").splitlines():
        log.write(line + "\n")
        s = line.strip()
        if s.startswith("{"):
            try:
                rows.append(json.loads(s))
                continue
            except json.JSONDecodeError:
                pass
        tail.append(line)
    log.flush()
    return dict(rows=rows, rc=proc.returncode, timed_out=timed_out, seconds=round(time.time() - t0, 1),
                tail="\n".join(tail[-15:]))


def child(kind: str, spec: dict, timeout: float, log) -> dict:
    return run_lines([sys.executable, str(BENCH / "gpu_children.py"), kind, json.dumps(spec)], timeout, log)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# ---------------------------------------------------------------------------- 1. smoke
def stage_smoke(a, timeout: float, log, ctx: dict) -> dict:
    runs = [(m, b) for b in ("flash", "cudnn") for m in ("none", "checkpointing", "streambp", "streambp_offload")]
    spec = dict(shape=a.shape, layers=None, seq=256 if a.dry_run else 16384, steps=3, device=a.device, runs=runs,
                streambp_chunk=64 if a.dry_run else 4096, seconds=timeout - 5)
    res = child("smoke", spec, timeout, log)
    rows = [r for r in res["rows"] if "mode" in r]
    trained = [r for r in rows if r.get("ok")]
    ref = next((r for r in trained if (r["mode"], r["backend"]) == ("none", "flash")), None)
    worst = {"loss": 0.0, "grad_norm": 0.0}
    off = []
    for r in trained if ref else []:
        for key, tol in (("loss", SMOKE_LOSS_RTOL), ("grad_norm", SMOKE_GRAD_RTOL)):
            for step, (x, y) in enumerate(zip(r[key], ref[key]), 1):
                worst[key] = max(worst[key], rel(x, y))
                if rel(x, y) > tol:
                    off.append(f"{r['mode']}/{r['backend']} {key} step {step}: {x:.6g} vs {y:.6g}")
    failed = [f"{r['mode']}/{r['backend']}: {r.get('error')}" for r in rows if r.get("ok") is False]
    ok = bool(ref) and not off and not failed
    return dict(ok=ok, rows=rows, agree=not off, disagreements=off, failed=failed, worst_rel=worst,
                partial=len(trained) + len(failed) < len(runs),
                tolerances=dict(loss=SMOKE_LOSS_RTOL, grad_norm=SMOKE_GRAD_RTOL), rc=res["rc"],
                timed_out=res["timed_out"], tail=res["tail"] if not ok else None)


# ---------------------------------------------------------------------------- 2. the planner against the GPU
def plan_trials(dry_run: bool) -> List[dict]:
    """What the plan stage measures, in order: full depth at 32K and 128K per mode, then StreamBP +
    offload at reduced depth (2 and 4 layers of the 1B width) at 256K, 512K and 1M."""
    if dry_run:
        full, reduced, shape, layers = [256, 512], [(1, 1024), (2, 1024)], "tiny", 2
        chunks = dict(streambp_chunk=128, loss_chunk=256)
    else:
        full, shape, layers = [32768, 131072], "llama1b", 16
        reduced = [(2, 262144), (4, 262144), (2, 524288), (4, 524288), (2, 1048576)]
        chunks = dict(streambp_chunk=4096, loss_chunk=8192)
    out = [dict(shape=shape, layers=layers, mode=m, seq=s, **chunks) for s in full for m in FULL_MODES]
    return out + [dict(shape=shape, layers=n, mode="streambp_offload", seq=s, **chunks) for n, s in reduced]


def stage_plan(a, timeout: float, log, ctx: dict) -> dict:
    from gpu_plans import plan_key

    plans = ctx["plans"]()
    gpu = ctx["gpu"]
    trials = [dict(t, predicted_s=(plans.get(plan_key(gpu, t)) or {}).get("planned_step_s"))
              for t in plan_trials(a.dry_run)]
    rows, deadline = [], time.time() + timeout
    for depth in sorted({t["layers"] for t in trials}, reverse=True):  # full depth first: one model per depth
        group = [t for t in trials if t["layers"] == depth]
        left = deadline - time.time()
        if left < 10:
            rows += [dict(t, ok=None, skipped="stage budget spent") for t in group]
            continue
        share = left * len(group) / sum(1 for t in trials if t["layers"] <= depth)
        res = child("measure", dict(trials=group, device=a.device, seconds=share - 5, repeats=1), share, log)
        got = {(r["layers"], r["mode"], r["seq"]): r for r in res["rows"] if "layers" in r}
        why = f"child rc {res['rc']}" + (" (killed at its budget)" if res["timed_out"] else "")
        rows += [got.get((t["layers"], t["mode"], t["seq"]), dict(t, ok=False, error=why)) for t in group]
    plans = ctx["plans"](wait=True)  # the background plans, if any were missing, are needed now
    for r in rows:
        p = plans.get(plan_key(gpu, r))
        if p:
            r.update(p)
        if p and r.get("ok") and r.get("peak_gib"):
            r["peak_ratio"] = round(p["planned_gib"] / r["peak_gib"], 4)
            r["time_ratio"] = round(p["planned_step_s"] / r["step_s"], 4) if r.get("step_s") else None
    depth = depth_check(rows)
    checked = [r for r in rows if r.get("peak_ratio")]
    ctx["measured"] = rows
    failed = [f"L{r['layers']} {r['mode']} {r['seq']}: {r.get('error', 'out of memory')}" for r in rows
              if r.get("ok") is False]
    unplanned = [r for r in rows if r.get("ok") and "planned_gib" not in r]
    # On CPU no device peak is measured (the dry run checks the plumbing: every trial ran and was planned).
    compared = bool(checked) if a.device == "cuda" else any(r.get("ok") for r in rows)
    return dict(ok=compared and not failed and not unplanned, gpu=gpu, rows=rows, depth=depth, failed=failed,
                unplanned=len(unplanned),
                peak_within=all(abs(r["peak_ratio"] - 1) <= PLAN_PEAK_RTOL for r in checked) if checked else None,
                time_within=all(abs(r["time_ratio"] - 1) <= PLAN_TIME_RTOL for r in checked if r.get("time_ratio"))
                if checked else None)


def depth_check(rows: List[dict]) -> List[dict]:
    """Per length measured at two depths: planned and measured peak change from the fewer to the more layers."""
    out = []
    by = {(r["layers"], r["seq"]): r for r in rows if r.get("peak_ratio") and r["mode"] == "streambp_offload"}
    for (layers, seq), r in sorted(by.items()):
        deeper = [by[k] for k in by if k[1] == seq and k[0] > layers]
        for d in deeper:
            planned, measured = d["planned_gib"] - r["planned_gib"], d["peak_gib"] - r["peak_gib"]
            out.append(dict(seq=seq, layers=(layers, d["layers"]), planned_delta_gib=round(planned, 3),
                            measured_delta_gib=round(measured, 3),
                            ratio=round(planned / measured, 4) if measured else None,
                            within=bool(measured) and abs(planned / measured - 1) <= PLAN_PEAK_RTOL))
    return out


# ---------------------------------------------------------------------------- 3. speed against HF + Liger
def stage_speed(a, timeout: float, log, ctx: dict) -> dict:
    from longtrain.models import get_model_args

    measured = [r for r in ctx.get("measured", []) if r.get("ok")]
    full = max((r["layers"] for r in measured), default=None)
    ours = [r for r in measured if r["layers"] == full]
    args = get_model_args(a.shape, **({} if full is None else {"num_layers": full}))
    seqs = sorted({r["seq"] for r in ours}) or ([256, 512] if a.dry_run else [32768, 131072])
    base = dict(skipped=None)
    if a.device != "cuda":
        base["skipped"] = "the baseline runs on CUDA only"
    elif ctx["baseline"] is None:
        base["skipped"] = "no baseline script (--baseline)"
    else:
        res = child("baseline", dict(script=str(ctx["baseline"]), shape=a.shape, mode="liger", seqs=seqs,
                                     seconds=timeout - 10, repeats=2), timeout, log)
        base.update(rows=res["rows"], rc=res["rc"], timed_out=res["timed_out"], tail=res["tail"] if res["rc"] else None)
    theirs = {r["seq"]: r for r in base.get("rows", []) if r.get("ok")}
    table = []
    for r in ours:
        mfu = args.flops_per_token(r["seq"]) * r["seq"] / r["step_s"] / PEAK_FLOPS if r.get("step_s") else None
        b = theirs.get(r["seq"])
        table.append(dict(mode=r["mode"], seq=r["seq"], tokens_per_s=r["tokens_per_s"], mfu=round(mfu, 4) if mfu else None,
                          liger_tokens_per_s=b["tokens_per_s"] if b else None,
                          ratio=round(r["tokens_per_s"] / b["tokens_per_s"], 3) if b else None))
    for seq, b in theirs.items():
        table.append(dict(mode="hf+liger", seq=seq, tokens_per_s=b["tokens_per_s"], liger_peak_gib=b.get("peak_gib"),
                          mfu=round(args.flops_per_token(seq) * seq / b["step_s"] / PEAK_FLOPS, 4)))
    ratios = [t["ratio"] for t in table if t.get("ratio") is not None]
    return dict(ok=bool(table) and (base["skipped"] is not None or bool(ratios)), rows=table, baseline=base,
                target=SPEED_TARGET, passed=all(x >= SPEED_TARGET for x in ratios) if ratios else None)


# ---------------------------------------------------------------------------- 4. kernels
def stage_kernels(a, timeout: float, log, ctx: dict) -> dict:
    if a.dry_run:
        geometry = ["--device", a.device, "--seqs", "256", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                    "--dtype", "fp32", "--warmup", "0", "--repeats", "1"]
        decomposition = ["--device", a.device, "--ranks", "2", "--seqs", "256", "--heads", "4", "--kv-heads", "2",
                         "--head-dim", "16", "--dtype", "fp32", "--warmup", "0", "--repeats", "1"]
    else:
        geometry = ["--seqs", "32768", "131072", "--warmup", "1", "--repeats", "2", "--head-dim", "64"]
        decomposition = ["--ranks", "2", "4", "--seqs", "32768", "--repeats", "2", "--docs", "none"]
    rows, runs, deadline = [], [], time.time() + timeout
    for backend in ("flash", "cudnn"):
        left = deadline - time.time() - 15
        if left < 5:
            runs.append(dict(backend=backend, skipped="stage budget spent"))
            continue
        res = run_lines([sys.executable, str(BENCH / "attention_kernels.py"), *geometry, "--impls", "sdpa", "local",
                         "block", "--docs", "none", "packed", "--block-backend", backend], left * 0.5, log)
        rows += res["rows"]
        runs.append(dict(backend=backend, rc=res["rc"], timed_out=res["timed_out"], seconds=res["seconds"],
                         tail=res["tail"] if res["rc"] else None))
    dec = run_lines([sys.executable, str(BENCH / "sp_decomposition.py"), *decomposition],
                    max(5.0, deadline - time.time()), log)
    failed = [f"{r['impl']} S={r['S']} docs={r['docs']} backend={r.get('block_backend')}: {r.get('error')}"
              for r in rows if r.get("ok") is False]
    failed += [f"{r.get('layout')} P={r.get('P')} S={r.get('S')}: {r.get('error')}" for r in dec["rows"]
               if r.get("ok") is False]
    failed += [f"{r['impl']} S={r['S']} docs={r['docs']}: {r['fallbacks']} fallbacks" for r in rows if r.get("fallbacks")]
    ratios = {}
    for r in dec["rows"]:
        if r.get("ok") and r.get("ratio") is not None:
            ratios[r["layout"]] = min(ratios.get(r["layout"], float("inf")), r["ratio"])
    return dict(ok=bool(rows) and not failed, rows=rows, runs=runs, decomposition=dec["rows"], min_ratio=ratios,
                failed=failed, tolerance=2e-2)


# ---------------------------------------------------------------------------- 5. then
def stage_pytest_gpu(a, timeout: float, log, ctx: dict) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if re.search(r"mark\.gpu\b", p.read_text(errors="ignore")))
    report = ctx["scratch"] / "fallbacks.json"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "fallback_guard",
           "-o", "addopts=", "-ra", *files]
    res = run_lines(cmd, timeout, log, child_env({"LONGTRAIN_FALLBACK_REPORT": str(report)}))
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", res["tail"])}
    fallbacks = json.loads(report.read_text()) if report.is_file() else None
    ok = res["rc"] == 0 and not res["timed_out"] and fallbacks == {} and (a.device != "cuda" or counts.get("passed"))
    return dict(ok=bool(ok), rc=res["rc"], timed_out=res["timed_out"], counts=counts, files=files,
                fallback_tests=fallbacks, tail=res["tail"] if not ok else None)


def stage_moe(a, timeout: float, log, ctx: dict) -> dict:
    res = child("moe", dict(device=a.device, dry_run=a.dry_run), timeout, log)
    row = dict(res["rows"][-1]) if res["rows"] else {}
    row["ok"] = res["rc"] == 0 and bool(row.get("ok"))
    return dict(row, rc=res["rc"], timed_out=res["timed_out"], tail=res["tail"] if res["rc"] else None)


HOST_GIB_8B_OFFLOAD = 150
"""Host memory an 8B ZeRO-2 optimizer-offload trial needs: fp32 master weights, Adam moments and
gradients in pinned host memory (16 bytes per parameter, 8B parameters: 120 GiB) and the process."""


def stage_zero_offload(a, timeout: float, log, ctx: dict) -> dict:
    import psutil

    if a.dry_run:
        trials = [["--shapes", "tiny", "--modes", "stage0", "--seq", "256", "--steps", "2", "--device", a.device]]
    else:
        trials = [["--shapes", "llama1b", "--modes", "stage0", "offload", "--seq", "8192", "--steps", "3"]]
    host_gib = psutil.virtual_memory().total / 2**30
    eight_b = None if a.dry_run else (
        f"host has {host_gib:.0f} GiB, an 8B offload trial needs {HOST_GIB_8B_OFFLOAD}" if host_gib < HOST_GIB_8B_OFFLOAD
        else None)
    if not a.dry_run and eight_b is None:
        trials.append(["--shapes", "llama8b", "--modes", "offload", "--seq", "8192", "--steps", "3", "--largest"])
    rows, runs, deadline = [], [], time.time() + timeout
    build = ctx["cpu_adam"]()
    for args in trials:
        left = deadline - time.time()
        if left < 10:
            runs.append(dict(args=args, skipped="stage budget spent"))
            continue
        res = run_lines([sys.executable, str(BENCH / "zero_memory.py"), *args], left, log,
                        child_env({"DS_ACCELERATOR": "cuda"} if a.device == "cuda" else None))
        rows += res["rows"]
        runs.append(dict(args=args, rc=res["rc"], timed_out=res["timed_out"], seconds=res["seconds"],
                         tail=res["tail"] if res["rc"] else None))
    return dict(ok=any(r.get("ok") for r in rows), rows=rows, runs=runs, host_gib=round(host_gib, 1),
                eight_b_skipped=eight_b, **build)


# ---------------------------------------------------------------------------- 6. the 8B one-GPU layout
EIGHT_B_RECIPE = "llama8b_1gpu"
HOST_MARGIN_GIB = 24
"""Host memory a trial of the 8B stage needs beyond what its plan says (the process, the data, the CUDA
context, DeepSpeed's CPU Adam)."""


def eight_b_trials(dry_run: bool) -> List[dict]:
    """What the 8B stage runs, in order: the ``llama8b_1gpu`` recipe's layout (ZeRO-3 with parameters and
    optimizer on the host, StreamBP with the layer inputs offloaded) at 2 and 4 of its 32 layers at 256K
    tokens, then 2 layers at 512K and 1M, one trainer step each. The dry run: the tiny model at 1 and 2
    layers, 1,024 tokens, in fp32 and without the host optimizer (CPU Adam is built for CUDA runs)."""
    if dry_run:
        base = ["model.name=tiny", "trainer.precision=fp32", "zero.offload_optimizer=none", "zero.offload_params=none",
                "memory.streambp.chunk_size=256", "trainer.loss_chunk_size=256"]
        points = [(1, 1024), (2, 1024)]
    else:
        base, points = [], [(2, 262144), (4, 262144), (2, 524288), (2, 1048576)]
    return [dict(recipe=EIGHT_B_RECIPE, layers=n, seq=seq, overrides=[f"model.num_layers={n}", f"data.seq_len={seq}",
                                                                       *base]) for n, seq in points]


def stage_eight_b(a, timeout: float, log, ctx: dict) -> dict:
    """Planned against measured peak of the 8B one-GPU layout at reduced depth (each trial its own
    process); a trial is skipped, with the reason, where the host lacks the memory its plan needs."""
    import psutil
    from gpu_plans import recipe_key

    plans = ctx["plans"](wait=True, timeout=min(60.0, timeout / 4))
    rows, deadline = [], time.time() + timeout
    build = ctx["cpu_adam"]() if a.device == "cuda" else {}
    margin = 1 if a.dry_run else HOST_MARGIN_GIB
    for t in eight_b_trials(a.dry_run):
        row = dict(layers=t["layers"], seq=t["seq"], **(plans.get(recipe_key(ctx["gpu"], t)) or {}))
        host = psutil.virtual_memory().available / 2**30  # what earlier trials left
        need = (row.get("planned_host_gib") or 0.0) + margin
        left = deadline - time.time()
        guess = (row.get("planned_step_s") or 0.0) * 2 + 60  # one step, the engine's setup and CPU Adam
        if "planned_gib" not in row:
            row.update(ok=None, skipped="not planned (bench/gpu_plans.py)")
        elif host < need:
            row.update(ok=None, skipped=f"host has {host:.0f} GiB available, the plan needs {need:.0f} "
                                        f"({row['planned_host_gib']:.0f} + {margin} for the process)")
        elif not a.dry_run and guess > left:
            row.update(ok=None, skipped=f"about {guess:.0f} s (planned step x 2 + 60), {left:.0f} s left")
        else:
            spec = dict(recipe=t["recipe"], overrides=t["overrides"], seq=t["seq"], steps=1, device=a.device,
                        trial=dict(layers=t["layers"], seq=t["seq"]))
            res = child("recipe", spec, left, log)
            got = res["rows"][-1] if res["rows"] else dict(ok=False, error=f"child rc {res['rc']}" + (
                " (killed at its budget)" if res["timed_out"] else ""))
            row.update({k: v for k, v in got.items() if k not in ("layers", "seq")})
            if row.get("ok") and a.device == "cuda":
                row["peak_ratio"] = round(row["planned_gib"] / row["peak_gib"], 4)
        rows.append(row)
    checked = [r for r in rows if r.get("peak_ratio")]
    failed = [f"L{r['layers']} {r['seq']}: {r.get('error')}" for r in rows if r.get("ok") is False]
    ran = any(r.get("ok") for r in rows)
    return dict(ok=None if not ran and not failed else (ran and not failed), rows=rows, failed=failed,
                recipe=EIGHT_B_RECIPE, host_gib=round(psutil.virtual_memory().total / 2**30, 1),
                peak_within=all(abs(r["peak_ratio"] - 1) <= PLAN_PEAK_RTOL for r in checked) if checked else None,
                **build)


STAGES = {"smoke": stage_smoke, "plan": stage_plan, "speed": stage_speed, "kernels": stage_kernels,
          "pytest_gpu": stage_pytest_gpu, "moe": stage_moe, "zero_offload": stage_zero_offload,
          "eight_b": stage_eight_b}
SHARES = {"smoke": 0.14, "plan": 0.28, "speed": 0.12, "kernels": 0.11, "pytest_gpu": 0.07, "moe": 0.03,
          "zero_offload": 0.12, "eight_b": 0.13}
MIN_S = {"smoke": 40, "plan": 40, "speed": 30, "kernels": 20, "pytest_gpu": 20, "moe": 10, "zero_offload": 40,
         "eight_b": 60}
