"""GPU validation in one command: every CUDA path and benchmark of longtrain on one GPU, in a budget.

Stages, in order, each in its own subprocess with a timeout (an OOM, a crash or a hang costs only
that stage); each stage's result is appended to ``<out>/gpu_suite.json`` as soon as it finishes,
and ``<out>/gpu_suite.md`` is rewritten, so a run cut short still leaves what it measured:

1. ``pytest_gpu``: ``pytest -m gpu`` over the test files that have ``gpu`` tests, with the
   ``bench/fallback_guard.py`` plugin: a test whose fused block kernels fell back to the
   reference kernels fails, and the stage names it.
2. ``attention``: ``bench/attention_kernels.py``: SDPA, ``local_attention`` and the ring block
   kernels, one document and packed documents, d=64 and 128, 32K and 128K; once with SDPA and the
   block kernels on flash, once both on cuDNN (and SDPA on cuDNN once more without GQA, which
   its cuDNN kernel does not take natively). Any ``block`` row with reference fallbacks fails
   the stage, naming the row.
3. ``sp_decomposition``: ``bench/sp_decomposition.py``: ring and Ulysses split on one GPU against
   the unsplit kernel (target ratio >= 0.9).
4. ``train_ladder``: a full training step (forward, backward, AdamW) on the Llama-3.2-1B shape at
   lengths doubling from 32K, per mode until it fails: longtrain ``checkpointing``, ``streambp``,
   ``streambp_offload`` (``bench/train_step.py``'s trial) and the baseline ``hf``, ``liger``
   (``--baseline``, the HF script's own trial), one subprocess per mode. Before each length the
   step time is predicted from the last two; a length whose predicted step exceeds
   ``--step-cap`` or the mode's remaining time is recorded as skipped with the reason.
5. ``zero_offload``: ``bench/zero_memory.py``: stage 0 against ZeRO-2 optimizer offload on the 1B
   shape, then offload on ``llama8b`` and ``qwen3_8b`` (the largest that trains is reported).
   DeepSpeed's CPU Adam is JIT-built (ninja and a C++ compiler, CPU code only) in a background
   process started with the suite, so the build overlaps the GPU stages.
6. ``moe``: the MoE experts' grouped GEMM forward + backward against the per-expert loop.
7. ``plan_check``: ``bench/plan_check.py``: the planner's peak (``longtrain-plan`` for this GPU) of
   ``bench/train_step.py``'s configurations against their measured ``torch.cuda.max_memory_allocated()``
   (target: within 5%).

Budget: ``--budget`` seconds (default 480) for everything; each stage gets its share
(:data:`SHARES`) plus what earlier stages left unused; a stage with less than its minimum left is
recorded as skipped with the reason. Summary targets (with pass flags) in the JSON's ``targets``.

Usage, on a machine with one GPU:
  python bench/gpu_suite.py --out runs/gpu_suite --budget 480 --baseline .bench/hf_baseline.py
CPU dry run (tiny shapes, every stage's plumbing, ~1 minute; part of the default tests):
  python bench/gpu_suite.py --device cpu --dry-run --out /tmp/gpu_suite_dry
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
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
SHARES = {"pytest_gpu": 0.08, "attention": 0.17, "sp_decomposition": 0.07, "train_ladder": 0.36,
          "zero_offload": 0.18, "moe": 0.05, "plan_check": 0.09}
MIN_S = {"pytest_gpu": 20, "attention": 20, "sp_decomposition": 15, "train_ladder": 30, "zero_offload": 40,
         "moe": 10, "plan_check": 30}
LADDER_MODES = ["liger", "streambp", "checkpointing", "hf", "streambp_offload"]
BASELINE_MODES = ("hf", "liger")
TARGETS = {"max_seq_vs_liger": 4.0, "bytes_per_token_1b": 40 * 1024, "tokens_per_s_vs_liger": 1.4,
           "decomposition_ratio": 0.9, "plan_vs_measured": 0.05}


# ---------------------------------------------------------------------------- helpers
def child_env(extra: Optional[dict] = None) -> dict:
    path = [str(REPO), str(BENCH), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **(extra or {})}


def run_lines(cmd: List[str], timeout: float, env: Optional[dict] = None, log=None) -> dict:
    """Run ``cmd`` for at most ``timeout`` s; its JSON lines (kept even when it is killed), rc, tail."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    rows, tail, timed_out = [], [], False
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        timed_out = True
    for line in (out or "").splitlines():
        if log is not None:
            log.write(line + "\n")
        s = line.strip()
        if s.startswith("{"):
            try:
                rows.append(json.loads(s))
                continue
            except json.JSONDecodeError:
                pass
        tail.append(line)
    if log is not None:
        log.flush()
    return dict(rows=rows, rc=proc.returncode, timed_out=timed_out, seconds=round(time.time() - t0, 1),
                tail="\n".join(tail[-15:]))


def find_baseline(given: Optional[str]) -> Optional[Path]:
    candidates = [given] if given else [".bench/hf_baseline.py", "../shared/bench/hf_baseline.py",
                                        "shared/bench/hf_baseline.py"]
    for c in candidates:
        p = (REPO / c).resolve() if not os.path.isabs(c) else Path(c)
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------------- stages
def stage_pytest_gpu(a, timeout: float, log) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if re.search(r"mark\.gpu\b", p.read_text(errors="ignore")))
    if not files:
        return dict(ok=False, reason="no test file has gpu-marked tests")
    report = Path(a.out) / "fallbacks.json"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "fallback_guard",
           "-o", "addopts=", "-ra", *files]
    res = run_lines(cmd, timeout, child_env({"LONGTRAIN_FALLBACK_REPORT": str(report)}), log)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", res["tail"])}
    fallbacks = json.loads(report.read_text()) if report.is_file() else None
    ok = res["rc"] == 0 and not res["timed_out"] and fallbacks == {}
    if a.device == "cuda" and counts.get("passed", 0) == 0:
        ok = False
    return dict(ok=ok, rc=res["rc"], timed_out=res["timed_out"], counts=counts, files=files,
                fallback_tests=fallbacks, tail=res["tail"] if not ok else None)


def stage_attention(a, timeout: float, log) -> dict:
    if a.dry_run:
        geometry = ["--device", a.device, "--seqs", "256", "--heads", "4", "--kv-heads", "2", "--dtype", "fp32",
                    "--warmup", "0", "--repeats", "1"]
        dims, combos = [16], [("auto", "cudnn", "2", ("sdpa", "local", "block"))]
    else:
        geometry = ["--seqs", "32768", "131072", "--warmup", "1", "--repeats", "3"]
        # (SDPA backend, block backend, KV heads, impls): SDPA's cuDNN kernel takes no native GQA,
        # so SDPA on cuDNN is measured once more with 32 KV heads (same FLOPs: plain multi-head)
        dims, combos = [64, 128], [("flash", "flash", "8", ("sdpa", "local", "block")),
                                   ("cudnn", "cudnn", "8", ("sdpa", "local", "block")),
                                   ("cudnn", "cudnn", "32", ("sdpa",))]
    rows, runs, deadline = [], [], time.time() + timeout
    for dim in dims:
        for sdpa, block, kv_heads, impls in combos:
            left = deadline - time.time()
            if left < 5:
                runs.append(dict(head_dim=dim, sdpa=sdpa, block=block, kv_heads=kv_heads, skipped="stage budget spent"))
                continue
            cmd = [sys.executable, str(BENCH / "attention_kernels.py"), *geometry, "--head-dim", str(dim),
                   "--kv-heads", kv_heads, "--impls", *impls, "--docs", "none", "packed", "--sdpa-backend", sdpa,
                   "--block-backend", block]
            res = run_lines(cmd, left, log=log)
            rows += res["rows"]
            runs.append(dict(head_dim=dim, sdpa=sdpa, block=block, kv_heads=kv_heads, rc=res["rc"],
                             timed_out=res["timed_out"], seconds=res["seconds"], tail=res["tail"] if res["rc"] else None))
    fell_back = [f"{r['impl']} S={r['S']} docs={r['docs']} D={r['D']} block={r.get('block_backend')}: "
                 f"{r['fallbacks']} fallbacks" for r in rows if r.get("fallbacks")]
    # a run cut by the budget keeps its rows (partial); a crash or a fallback fails the stage
    ok = bool(rows) and not fell_back and all(r.get("rc") == 0 or r.get("timed_out") for r in runs if "rc" in r)
    return dict(ok=ok, rows=rows, runs=runs, fallback_rows=fell_back, partial=any(r.get("timed_out") or
                                                                               r.get("skipped") for r in runs))


def stage_sp_decomposition(a, timeout: float, log) -> dict:
    if a.dry_run:
        args = ["--device", a.device, "--ranks", "2", "--seqs", "256", "--heads", "4", "--kv-heads", "2",
                "--head-dim", "16", "--dtype", "fp32", "--warmup", "0", "--repeats", "1"]
    else:
        args = ["--ranks", "2", "4", "--seqs", "32768", "131072", "--repeats", "2", "--docs", "none"]
    res = run_lines([sys.executable, str(BENCH / "sp_decomposition.py"), *args], timeout, log=log)
    ratios = {}
    for r in res["rows"]:
        if r.get("ok") and r.get("ratio") is not None:
            ratios[r["layout"]] = min(ratios.get(r["layout"], float("inf")), r["ratio"])
    return dict(ok=(res["rc"] == 0 or res["timed_out"]) and bool(res["rows"]), rc=res["rc"], timed_out=res["timed_out"],
                rows=res["rows"],
                min_ratio=ratios, tail=res["tail"] if res["rc"] else None)


def stage_train_ladder(a, timeout: float, log) -> dict:
    baseline = find_baseline(a.baseline)
    deadline = time.time() + timeout
    modes = [m for m in LADDER_MODES if m in a.ladder_modes]
    rows, runs, groups = [], {}, []
    for mode in modes:
        if mode in BASELINE_MODES and (a.device != "cuda" or baseline is None):
            runs[mode] = dict(skipped="the baseline runs on CUDA only" if a.device != "cuda"
                              else "no baseline script (--baseline)")
        elif a.dry_run and groups and groups[-1][0] not in BASELINE_MODES and mode not in BASELINE_MODES:
            groups[-1].append(mode)  # dry run: longtrain's modes share one process (one model build)
        else:
            groups.append([mode])  # one process per mode: an OOM or a hang costs only that mode
    for i, group in enumerate(groups):
        left = deadline - time.time()
        share = left / (len(groups) - i)
        if share < (5 if a.dry_run else 20):
            for mode in group:
                runs[mode] = dict(skipped=f"ladder budget spent ({left:.0f} s left)")
            continue
        spec = dict(modes=group, shape=a.shape, start=a.start, max=a.max_seq, repeats=a.repeats,
                    seconds=share - (2 if a.dry_run else 10), step_cap=a.step_cap, device=a.device,
                    baseline=str(baseline) if baseline else None, streambp_chunk=a.streambp_chunk)
        res = run_lines([sys.executable, __file__, "--ladder-child", json.dumps(spec)], share, log=log)
        rows += [r for r in res["rows"] if r.get("mode") in group]
        for mode in group:
            runs[mode] = dict(rc=res["rc"], timed_out=res["timed_out"], seconds=res["seconds"],
                              tail=res["tail"] if res["rc"] else None)
    summaries = {m: summarise_mode(a.shape, m, rows) for m in modes}
    return dict(ok=any(s["max_seq"] for s in summaries.values()), shape=a.shape, rows=rows, runs=runs,
                summaries=summaries, baseline=str(baseline) if baseline else None)


def stage_zero_offload(a, timeout: float, log) -> dict:
    if a.dry_run:
        trials = [["--shapes", "tiny", "--modes", "stage0", "--seq", "256", "--steps", "2", "--device", a.device]]
    else:
        trials = [["--shapes", "llama1b", "--modes", "stage0", "offload", "--seq", "8192", "--steps", "3"],
                  ["--shapes", "llama8b", "qwen3_8b", "--modes", "offload", "--seq", "8192", "--steps", "3",
                   "--largest"]]
    rows, runs, deadline = [], [], time.time() + timeout
    build = {}
    if PREBUILD.get("proc") is not None:  # DeepSpeed's CPU Adam, JIT-built in the background since the start
        proc = PREBUILD["proc"]
        try:
            proc.wait(timeout=max(1.0, deadline - time.time() - 30))
        except subprocess.TimeoutExpired:
            pass
        build = dict(cpu_adam_build_rc=proc.poll(), cpu_adam_build_s=round(time.time() - PREBUILD["t0"], 1))
    for args in trials:
        left = deadline - time.time()
        if left < 10:
            runs.append(dict(args=args, skipped="stage budget spent"))
            continue
        res = run_lines([sys.executable, str(BENCH / "zero_memory.py"), *args], left,
                        child_env({"DS_ACCELERATOR": "cuda"} if a.device == "cuda" else None), log)
        rows += res["rows"]
        runs.append(dict(args=args, rc=res["rc"], timed_out=res["timed_out"], seconds=res["seconds"],
                         tail=res["tail"] if res["rc"] else None))
    largest = [r for r in rows if "largest_shape_that_trains" in r]
    return dict(ok=any(r.get("ok") for r in rows), rows=rows, runs=runs, **build,
                largest_shape_that_trains=largest[-1]["largest_shape_that_trains"] if largest else None)


def stage_moe(a, timeout: float, log) -> dict:
    spec = dict(device=a.device, dry_run=a.dry_run)
    res = run_lines([sys.executable, __file__, "--moe-child", json.dumps(spec)], timeout, log=log)
    row = dict(res["rows"][-1]) if res["rows"] else {}
    row["ok"] = res["rc"] == 0 and bool(row.get("ok"))
    return dict(row, rc=res["rc"], timed_out=res["timed_out"], tail=res["tail"] if res["rc"] else None)


def stage_plan_check(a, timeout: float, log) -> dict:
    """The planner's peak against ``torch.cuda.max_memory_allocated()`` (``bench/plan_check.py``)."""
    args = ["--dry-run"] if a.dry_run else ["--shape", "llama1b", "--seqs", "16384", "65536"]
    res = run_lines([sys.executable, str(BENCH / "plan_check.py"), *args], timeout, log=log)
    ratios = [r["planned_over_measured"] for r in res["rows"] if r.get("planned_over_measured")]
    return dict(ok=res["rc"] == 0 and bool(res["rows"]), rows=res["rows"], rc=res["rc"], timed_out=res["timed_out"],
                within_5pct=all(abs(x - 1) <= TARGETS["plan_vs_measured"] for x in ratios) if ratios else None,
                tail=res["tail"] if res["rc"] else None)


PREBUILD: dict = {}


def prebuild_cpu_adam(log_path: Path) -> None:
    """Start the JIT build of DeepSpeed's CPU Adam (ninja + the C++ compiler, CPU code only) in the
    background, so that the offload stage finds it built; its output goes to ``log_path``."""
    code = ("from deepspeed.accelerator import get_accelerator; "
            "get_accelerator().create_op_builder('CPUAdamBuilder').load()")
    PREBUILD["t0"] = time.time()
    PREBUILD["proc"] = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=open(log_path, "w"),
                                        stderr=subprocess.STDOUT, env=child_env({"DS_ACCELERATOR": "cuda"}),
                                        start_new_session=True)


STAGES = {"pytest_gpu": stage_pytest_gpu, "attention": stage_attention, "sp_decomposition": stage_sp_decomposition,
          "train_ladder": stage_train_ladder, "zero_offload": stage_zero_offload, "moe": stage_moe,
          "plan_check": stage_plan_check}


# ---------------------------------------------------------------------------- ladder (child process)
def ladder_child(spec: dict) -> None:
    """The length ladder of ``spec["modes"]`` (one baseline mode, or longtrain modes sharing one
    model) in this process, the time split evenly; one JSON line per length (run or skipped)."""
    import torch

    device = torch.device(spec["device"])
    modes = spec["modes"]
    end = time.time() + spec["seconds"]
    if modes[0] in BASELINE_MODES:
        assert len(modes) == 1
        mode = modes[0]
        mod_spec = importlib.util.spec_from_file_location("hf_baseline", spec["baseline"])
        base = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(base)
        model = base.build(spec["shape"], "sdpa")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def trial(mode, seq):
            return base.trial(model, opt, spec["shape"], mode, seq, spec["repeats"])
    else:
        sys.path.insert(0, str(BENCH))
        import train_step
        from longtrain.config import OptimConfig
        from longtrain.models import Transformer, get_model_args
        from longtrain.optim.optimizer import build_optimizer

        args = get_model_args(spec["shape"])
        torch.manual_seed(0)
        model = Transformer(args)
        model.init_weights()
        model.to(device).train()
        opt = build_optimizer(model, OptimConfig(), device)

        def trial(mode, seq):
            return train_step.trial(model, opt, args, mode, seq, spec["repeats"], device, 8192, spec["streambp_chunk"])
    for i, mode in enumerate(modes):
        ladder(mode, trial, spec, time.time() + (end - time.time()) / (len(modes) - i))


def ladder(mode: str, trial, spec: dict, deadline: float) -> None:
    """Double the length from ``spec["start"]`` until a trial fails, the predicted step passes the
    cap or the deadline, or ``spec["max"]``."""
    seq, times = spec["start"], []
    while seq <= spec["max"]:
        left = deadline - time.time()
        predicted = None
        if times:
            growth = min(4.0, max(2.0, times[-1] / times[-2])) if len(times) > 1 else 3.0
            predicted = times[-1] * growth
        reason = None
        if predicted is not None and predicted > spec["step_cap"]:
            reason = f"predicted step {predicted:.1f} s over the per-step cap {spec['step_cap']} s"
        elif predicted is not None and predicted * (spec["repeats"] + 0.5) > left:
            reason = f"predicted {predicted * spec['repeats']:.1f} s for the trial, {left:.1f} s left"
        if reason:
            print(json.dumps(dict(mode=mode, seq=seq, ok=None, skipped=reason)), flush=True)
            break
        row = trial(mode, seq)
        if not row.get("ok"):
            break
        times.append(row["step_s"])
        if row["step_s"] > spec["step_cap"]:
            print(json.dumps(dict(mode=mode, seq=seq * 2, ok=None,
                                  skipped=f"step at {seq} took {row['step_s']} s, over the cap")), flush=True)
            break
        seq *= 2


def summarise_mode(shape: str, mode: str, rows: List[dict]) -> dict:
    """Longest length that ran, tokens/s, peak memory, bytes per token, MFU (989 TFLOP/s peak)."""
    from longtrain.models import get_model_args

    args = get_model_args(shape)
    ok = sorted((r for r in rows if r.get("mode") == mode and r.get("ok")), key=lambda r: r["seq"])
    fail = [r for r in rows if r.get("mode") == mode and r.get("ok") is False]
    skipped = [r for r in rows if r.get("mode") == mode and r.get("skipped")]
    out = dict(mode=mode, max_seq=None, stopped_by="failure (OOM)" if fail else
               (skipped[0]["skipped"] if skipped else "end of ladder or budget"))
    if not ok:
        return out
    top = ok[-1]
    out.update(max_seq=top["seq"], tokens_per_s=top.get("tokens_per_s"), step_s=top.get("step_s"))
    per_len = {}
    for r in ok:
        gib = r.get("peak_gib")
        per_len[r["seq"]] = dict(tokens_per_s=r.get("tokens_per_s"), step_s=r.get("step_s"), peak_gib=gib,
                                 mfu=round(args.flops_per_token(r["seq"]) * r["seq"] / r["step_s"] / PEAK_FLOPS, 4)
                                 if r.get("step_s") else None)
    out["per_length"] = per_len
    out["mfu"] = per_len[top["seq"]]["mfu"]
    if top.get("peak_gib") is not None:
        out["peak_bytes"] = int(top["peak_gib"] * 2**30)
        out["bytes_per_token_peak"] = round(top["peak_gib"] * 2**30 / top["seq"])
        if len(ok) >= 2 and ok[-2].get("peak_gib") is not None:
            out["bytes_per_token_marginal"] = round((top["peak_gib"] - ok[-2]["peak_gib"]) * 2**30
                                                    / (top["seq"] - ok[-2]["seq"]))
    return out


def ladder_targets(summaries: Dict[str, dict]) -> dict:
    liger = summaries.get("liger") or {}
    out = {}
    best = max((s for m, s in summaries.items() if m.startswith("streambp") and s.get("max_seq")),
               key=lambda s: s["max_seq"], default=None)
    if best and liger.get("max_seq"):
        ratio = best["max_seq"] / liger["max_seq"]
        out["max_seq_vs_liger"] = dict(value=round(ratio, 2), mode=best["mode"], target=TARGETS["max_seq_vs_liger"],
                                       passed=ratio >= TARGETS["max_seq_vs_liger"])
    for m in ("streambp", "streambp_offload"):
        s = summaries.get(m) or {}
        value = s.get("bytes_per_token_marginal")
        if value is not None:
            out[f"bytes_per_token_{m}"] = dict(value=value, target=TARGETS["bytes_per_token_1b"],
                                               passed=value <= TARGETS["bytes_per_token_1b"])
    for m in ("checkpointing", "streambp", "streambp_offload"):
        s = summaries.get(m) or {}
        for seq, name in ((32768, "32k"), (131072, "128k")):
            mine = (s.get("per_length") or {}).get(seq, {}).get("tokens_per_s")
            theirs = (liger.get("per_length") or {}).get(seq, {}).get("tokens_per_s")
            if mine and theirs:
                out[f"tokens_per_s_vs_liger_{name}_{m}"] = dict(
                    value=round(mine / theirs, 3), target=TARGETS["tokens_per_s_vs_liger"],
                    passed=mine / theirs >= TARGETS["tokens_per_s_vs_liger"])
    return out


# ---------------------------------------------------------------------------- MoE (child process)
def moe_child(spec: dict) -> None:
    import torch

    from longtrain.models.moe import Experts, use_grouped_mm

    device = torch.device(spec["device"])
    experts_n, hidden, inter, rows = (4, 32, 16, 64) if spec["dry_run"] else (128, 2048, 768, 65536)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    experts = Experts(experts_n, hidden, inter).to(device)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.02 * torch.randn_like(p))
    experts = experts.to(dtype)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    counts = torch.bincount(torch.randint(0, experts_n, (rows,)), minlength=experts_n).to(device)
    row = dict(experts=experts_n, hidden=hidden, intermediate=inter, rows=rows, dtype=str(dtype), ok=True,
               grouped=use_grouped_mm(x))

    def run(fn):
        out = fn(x, counts)
        grads = torch.autograd.grad(out.float().square().sum(), [x, experts.gate_up_proj, experts.down_proj])
        return out, grads

    def timed(fn, n=3):
        run(fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            res = run(fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return res, (time.perf_counter() - t0) / n * 1e3

    ref, row["reference_ms"] = timed(experts.reference, 1 if spec["dry_run"] else 3)
    if row["grouped"]:
        got, row["grouped_ms"] = timed(experts.forward)
        row["speedup"] = round(row["reference_ms"] / row["grouped_ms"], 2)
        errs = [((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-6)).item()
                for a, b in zip([got[0], *got[1]], [ref[0], *ref[1]])]
        row["max_rel_err"] = max(errs)
        row["ok"] = row["max_rel_err"] < 2e-2
    else:
        row["grouped_skipped"] = "the grouped GEMM needs CUDA, bf16 and torch._grouped_mm"
    row["reference_ms"] = round(row["reference_ms"], 3)
    row["grouped_ms"] = round(row["grouped_ms"], 3) if "grouped_ms" in row else None
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------------- output
def write_outputs(out: Path, result: dict) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_suite.md").write_text(markdown(result))


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def _k(n):
    return "-" if n is None else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# GPU suite: {meta['device_name']}, {meta['date']}", "",
             f"`{meta['command']}` (budget {meta['budget_s']} s, {meta['elapsed_s']} s used)", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, st in result["stages"].items():
        status = "skipped" if st.get("skipped") else ("ok" if st.get("ok") else "FAILED")
        note = st.get("skipped") or st.get("error") or ""
        lines.append(f"| {name} | {status} | {_fmt(st.get('seconds'))} | {note} |")
    st = result["stages"].get("pytest_gpu", {})
    if st.get("counts") is not None:
        lines += ["", f"`pytest -m gpu`: {st['counts']}; tests with reference fallbacks: "
                  f"{st.get('fallback_tests') or 'none'}"]
    st = result["stages"].get("attention", {})
    if st.get("rows"):
        lines += ["", "## Attention forward + backward", "",
                  "| impl | S | docs | D | Hkv | SDPA backend | block backend | ms | TFLOP/s | vs SDPA | fallbacks | cuDNN calls |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            lines.append(f"| {r['impl']} | {_k(r['S'])} | {r['docs']} | {r['D']} | {r['Hkv']} | {r.get('sdpa_backend')} | "
                         f"{r.get('block_backend')} | {_fmt(r.get('ms'))} | {_fmt(r.get('tflops'))} | "
                         f"{_fmt(r.get('ratio_to_sdpa'))} | {_fmt(r.get('fallbacks'))} | "
                         f"{_fmt(r.get('cudnn_calls'))} |" + ("" if r.get("ok") else f" {r.get('error')}"))
        if st.get("fallback_rows"):
            lines += ["", "**Reference fallbacks**: " + "; ".join(st["fallback_rows"])]
    st = result["stages"].get("sp_decomposition", {})
    if st.get("rows"):
        lines += ["", "## Sequence-parallel decomposition on one device", "",
                  "| layout | P | S | docs | unsplit ms | split ms | ratio | balance | max err |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            lines.append(f"| {r.get('layout')} | {r.get('P')} | {_k(r.get('S'))} | {r.get('docs')} | "
                         f"{_fmt(r.get('unsplit_ms'))} | {_fmt(r.get('split_ms'))} | {_fmt(r.get('ratio'))} | "
                         f"{_fmt(r.get('balance'))} | {_fmt(r.get('max_err'))} |")
    st = result["stages"].get("train_ladder", {})
    if st.get("summaries"):
        lines += ["", f"## Training step ladder ({st['shape']}, full step with AdamW)", "",
                  "| mode | longest sequence | tokens/s (at longest) | peak GiB | bytes/token (marginal) | MFU | stopped by |",
                  "|---|---|---|---|---|---|---|"]
        for m, s in st["summaries"].items():
            run = st["runs"].get(m, {})
            peak = s.get("peak_bytes")
            lines.append(f"| {m} | {_k(s.get('max_seq'))} | {_fmt(s.get('tokens_per_s'))} | "
                         f"{_fmt(None if peak is None else round(peak / 2**30, 2))} | "
                         f"{_fmt(s.get('bytes_per_token_marginal'))} | {_fmt(s.get('mfu'))} | "
                         f"{run.get('skipped') or s.get('stopped_by')} |")
        lines += ["", "| mode | S | step s | tokens/s | peak GiB | MFU |", "|---|---|---|---|---|---|"]
        for m, s in st["summaries"].items():
            for seq, r in (s.get("per_length") or {}).items():
                lines.append(f"| {m} | {_k(int(seq))} | {_fmt(r['step_s'])} | {_fmt(r['tokens_per_s'])} | "
                             f"{_fmt(r['peak_gib'])} | {_fmt(r['mfu'])} |")
    st = result["stages"].get("zero_offload", {})
    if st.get("rows"):
        lines += ["", "## ZeRO optimizer offload", "", "| shape | mode | seq | ok | step s | tokens/s | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            if "largest_shape_that_trains" in r:
                continue
            lines.append(f"| {r.get('shape')} | {r.get('mode')} | {r.get('seq')} | {r.get('ok')} | "
                         f"{_fmt(r.get('step_s'))} | {_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('peak_mem_gib'))} |")
        lines += ["", f"Largest shape that trains with offload: {st.get('largest_shape_that_trains') or '-'}"]
    st = result["stages"].get("plan_check", {})
    if st.get("rows"):
        lines += ["", "## Planned against measured peak memory (`bench/plan_check.py`)", "",
                  "| shape | mode | seq | planned GiB | measured GiB | planned / measured |", "|---|---|---|---|---|---|"]
        for r in st["rows"]:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['seq']} | {_fmt(r['planned_gib'])} | "
                         f"{_fmt(r.get('measured_gib'))} | {_fmt(r.get('planned_over_measured'))} |")
    st = result["stages"].get("moe", {})
    if "reference_ms" in st:
        lines += ["", "## MoE experts: grouped GEMM against the per-expert loop (forward + backward)", "",
                  "| experts | hidden | intermediate | rows | reference ms | grouped ms | speedup | max rel err |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {st['experts']} | {st['hidden']} | {st['intermediate']} | {st['rows']} | "
                  f"{_fmt(st['reference_ms'])} | {_fmt(st.get('grouped_ms'))} | {_fmt(st.get('speedup'))} | "
                  f"{_fmt(st.get('max_rel_err'))} |"]
    if result.get("targets"):
        lines += ["", "## Targets", "", "| target | value | goal | pass |", "|---|---|---|---|"]
        for name, t in result["targets"].items():
            lines.append(f"| {name} | {_fmt(t['value'])} | {t['target']} | {'yes' if t['passed'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def all_targets(stages: dict) -> dict:
    targets = {}
    ladder = stages.get("train_ladder", {})
    if ladder.get("summaries"):
        targets.update(ladder_targets(ladder["summaries"]))
    for layout, ratio in (stages.get("sp_decomposition", {}).get("min_ratio") or {}).items():
        targets[f"decomposition_ratio_{layout}"] = dict(value=ratio, target=TARGETS["decomposition_ratio"],
                                                        passed=ratio >= TARGETS["decomposition_ratio"])
    return targets


# ---------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=False, help="output directory (gpu_suite.json, gpu_suite.md, suite.log)")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole suite")
    p.add_argument("--baseline", help="path to the HF baseline script (hf_baseline.py); default: .bench/ "
                                      "or ../shared/bench/")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes: check every stage's plumbing")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--shape", default=None, help="ladder model shape (default llama1b; tiny with --dry-run)")
    p.add_argument("--ladder-modes", nargs="+", choices=LADDER_MODES, default=LADDER_MODES)
    p.add_argument("--start", type=int, default=None, help="first ladder length (default 32768)")
    p.add_argument("--max-seq", type=int, default=1 << 22)
    p.add_argument("--repeats", type=int, default=2, help="steps per ladder length (the fastest counts)")
    p.add_argument("--step-cap", type=float, default=90, help="per-step time cap of the ladder, seconds")
    p.add_argument("--streambp-chunk", type=int, default=None)
    p.add_argument("--ladder-child", help=argparse.SUPPRESS)
    p.add_argument("--moe-child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ladder_child:
        ladder_child(json.loads(a.ladder_child))
        return 0
    if a.moe_child:
        moe_child(json.loads(a.moe_child))
        return 0
    if not a.out:
        p.error("--out is required")
    a.shape = a.shape or ("tiny" if a.dry_run else "llama1b")
    a.start = a.start or (256 if a.dry_run else 32768)
    a.streambp_chunk = a.streambp_chunk or (100 if a.dry_run else 4096)
    if a.dry_run:
        a.max_seq = min(a.max_seq, 512)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1" if a.device == "cpu" else "8")
    t_start = time.time()
    device_name = "cpu"
    if a.device == "cuda":  # asked in a child: this process holds no CUDA context while the stages run
        probe = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available(); "
                                "print(torch.cuda.get_device_name(0))"], capture_output=True, text=True)
        if probe.returncode != 0:
            p.error("--device cuda: no CUDA device here (use --device cpu --dry-run for the plumbing)")
        device_name = probe.stdout.strip().splitlines()[-1]
    result = dict(meta=dict(command=" ".join(["python", "bench/gpu_suite.py", *(argv or sys.argv[1:])]),
                            device=a.device, device_name=device_name, dry_run=a.dry_run, budget_s=a.budget,
                            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            elapsed_s=0, peak_flops=PEAK_FLOPS),
                  stages={}, targets={})
    chosen = [s for s in STAGES if s in a.stages]
    if a.device == "cuda" and "zero_offload" in chosen:
        prebuild_cpu_adam(out / "cpu_adam_build.log")
    share_total = sum(SHARES[s] for s in chosen)
    with open(out / "suite.log", "a") as log:
        for i, name in enumerate(chosen):
            elapsed = time.time() - t_start
            later = sum(SHARES[s] for s in chosen[i + 1:]) / share_total * a.budget
            timeout = a.budget - elapsed - later
            minimum = 3 if a.dry_run else MIN_S[name]
            log.write(f"==== {name}: {timeout:.0f} s\n")
            if timeout < minimum:
                stage = dict(ok=None, skipped=f"budget: {max(0, timeout):.0f} s left for it, needs {minimum} s")
            else:
                t0 = time.time()
                try:
                    stage = STAGES[name](a, timeout, log)
                except Exception as exc:  # a bug in one stage's plumbing must not lose the others
                    stage = dict(ok=False, error=f"{type(exc).__name__}: {exc}")
                stage["seconds"] = round(time.time() - t0, 1)
                stage["timeout_s"] = round(timeout, 1)
            result["stages"][name] = stage
            result["targets"] = all_targets(result["stages"])
            result["meta"]["elapsed_s"] = round(time.time() - t_start, 1)
            write_outputs(out, result)
            print(json.dumps(dict(stage=name, ok=stage.get("ok"), seconds=stage.get("seconds"),
                                  skipped=stage.get("skipped"))), flush=True)
    failed = [n for n, s in result["stages"].items() if s.get("ok") is False]
    print(f"gpu_suite: {len(result['stages']) - len(failed)} stages ok or skipped, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; {out / 'gpu_suite.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
