"""The GPU suite's Markdown report (``gpu_suite.md``) and its summary targets, from the result dict
bench/gpu_suite.py writes as ``gpu_suite.json``."""
from __future__ import annotations

from typing import Dict, List


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def _k(n):
    return "-" if n is None else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


def _table(header: List[str], rows: List[List]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]


def targets(stages: Dict[str, dict]) -> Dict[str, dict]:
    """The headline checks with pass flags: smoke agreement, planned vs measured peak and time, the depth
    check, tokens/s over HF + Liger, kernel accuracy and the decomposition ratios."""
    out = {}
    smoke = stages.get("smoke", {})
    if smoke.get("rows"):
        out["smoke_modes_agree"] = dict(value=smoke.get("worst_rel"), target=smoke.get("tolerances"),
                                        passed=bool(smoke.get("ok")))
    plan = stages.get("plan", {})
    for r in plan.get("rows", []):
        name = f"L{r['layers']}_{r['mode']}_{_k(r['seq'])}"
        if r.get("peak_ratio") is not None:
            out[f"plan_peak_{name}"] = dict(value=r["peak_ratio"], target="1 +- 0.05",
                                            passed=abs(r["peak_ratio"] - 1) <= 0.05)
        if r.get("time_ratio") is not None:
            out[f"plan_time_{name}"] = dict(value=r["time_ratio"], target="1 +- 0.25",
                                            passed=abs(r["time_ratio"] - 1) <= 0.25)
    for d in plan.get("depth", []):
        out[f"plan_depth_{_k(d['seq'])}_L{d['layers'][0]}_to_L{d['layers'][1]}"] = dict(
            value=d["ratio"], target="1 +- 0.05", passed=d["within"])
    for r in stages.get("eight_b", {}).get("rows", []):
        if r.get("peak_ratio") is not None:
            out[f"plan_peak_8b_L{r['layers']}_{_k(r['seq'])}"] = dict(value=r["peak_ratio"], target="1 +- 0.05",
                                                                      passed=abs(r["peak_ratio"] - 1) <= 0.05)
    for r in stages.get("speed", {}).get("rows", []):
        if r.get("ratio") is not None:
            out[f"tokens_per_s_vs_liger_{_k(r['seq'])}_{r['mode']}"] = dict(value=r["ratio"], target=1.4,
                                                                            passed=r["ratio"] >= 1.4)
    kernels = stages.get("kernels", {})
    if kernels.get("rows"):
        worst = max((r.get("max_err") or 0.0 for r in kernels["rows"]), default=0.0)
        out["attention_max_err_vs_sdpa"] = dict(value=worst, target=kernels.get("tolerance"),
                                                passed=worst <= kernels.get("tolerance", 0))
    for layout, ratio in (kernels.get("min_ratio") or {}).items():
        out[f"decomposition_ratio_{layout}"] = dict(value=ratio, target=0.9, passed=ratio >= 0.9)
    return out


def markdown(result: dict) -> str:
    meta, stages = result["meta"], result["stages"]
    lines = [f"# GPU suite: {meta['device_name']}, {meta['date']}", "",
             f"`{meta['command']}` (budget {meta['budget_s']} s, {meta['elapsed_s']} s used)", ""]
    lines += _table(["stage", "status", "seconds", "note"],
                    [[n, "skipped" if s.get("skipped") else ("ok" if s.get("ok") else "FAILED"), s.get("seconds"),
                      s.get("skipped") or s.get("error") or "; ".join((s.get("failed") or s.get("disagreements") or [])[:3])]
                     for n, s in stages.items()])
    st = stages.get("smoke", {})
    if st.get("rows"):
        lines += ["", "## Smoke: every mode trains on CUDA (3 steps, same seed and data)", ""]
        lines += _table(["mode", "backend", "ok", "losses", "grad norms", "peak GiB", "kernel calls", "s"],
                        [[r["mode"], r["backend"], r.get("ok", r.get("skipped")),
                          ", ".join(f"{x:.5g}" for x in r.get("loss", [])),
                          ", ".join(f"{x:.4g}" for x in r.get("grad_norm", [])), r.get("peak_gib"),
                          r.get("kernel_calls"), r.get("seconds")] for r in st["rows"]])
        lines += ["", f"Largest relative difference from plain/flash: {st.get('worst_rel')} (tolerances "
                  f"{st.get('tolerances')})"]
    st = stages.get("plan", {})
    if st.get("rows"):
        lines += ["", f"## The planner against the GPU ({st.get('gpu')})", ""]
        lines += _table(["layers", "mode", "seq", "planned GiB", "measured GiB", "peak ratio", "planned s",
                         "measured s", "time ratio", "note"],
                        [[r["layers"], r["mode"], _k(r["seq"]), r.get("planned_gib"), r.get("peak_gib"),
                          r.get("peak_ratio"), r.get("planned_step_s"), r.get("step_s"), r.get("time_ratio"),
                          r.get("skipped") or r.get("error") or ""] for r in st["rows"]])
        if st.get("depth"):
            lines += ["", "Depth: the peak's change from fewer to more layers, planned against measured", ""]
            lines += _table(["seq", "layers", "planned delta GiB", "measured delta GiB", "ratio"],
                            [[_k(d["seq"]), f"{d['layers'][0]} -> {d['layers'][1]}", d["planned_delta_gib"],
                              d["measured_delta_gib"], d["ratio"]] for d in st["depth"]])
    st = stages.get("speed", {})
    if st.get("rows") or st.get("baseline"):
        lines += ["", "## Speed against HF + gradient checkpointing + Liger (same call)", ""]
        lines += _table(["mode", "seq", "tokens/s", "MFU", "HF+Liger tokens/s", "ratio"],
                        [[r["mode"], _k(r["seq"]), r.get("tokens_per_s"), r.get("mfu"), r.get("liger_tokens_per_s"),
                          r.get("ratio")] for r in st.get("rows", [])])
        if (st.get("baseline") or {}).get("skipped"):
            lines += ["", f"Baseline: {st['baseline']['skipped']}"]
    st = stages.get("kernels", {})
    if st.get("rows"):
        lines += ["", "## Attention forward + backward, checked against SDPA", ""]
        lines += _table(["impl", "S", "docs", "D", "backend", "ms", "TFLOP/s", "vs SDPA", "max err", "calls"],
                        [[r["impl"], _k(r["S"]), r["docs"], r["D"], r.get("block_backend"), r.get("ms"), r.get("tflops"),
                          r.get("ratio_to_sdpa"), r.get("max_err"), r.get("calls")] for r in st["rows"]])
        if st.get("decomposition"):
            lines += ["", "Sequence-parallel decomposition on one device (error against the unsplit kernel)", ""]
            lines += _table(["layout", "P", "S", "unsplit ms", "split ms", "ratio", "balance", "max err"],
                            [[r.get("layout"), r.get("P"), _k(r.get("S")), r.get("unsplit_ms"), r.get("split_ms"),
                              r.get("ratio"), r.get("balance"), r.get("max_err")] for r in st["decomposition"]])
    st = stages.get("pytest_gpu", {})
    if st.get("counts") is not None:
        lines += ["", f"`pytest -m gpu`: {st['counts']}; tests with reference fallbacks: "
                  f"{st.get('fallback_tests') or 'none'}"]
    st = stages.get("moe", {})
    if "reference_ms" in st:
        lines += ["", "## MoE experts: grouped GEMM against the per-expert loop (forward + backward)", ""]
        lines += _table(["experts", "hidden", "intermediate", "rows", "reference ms", "grouped ms", "speedup", "max rel err"],
                        [[st["experts"], st["hidden"], st["intermediate"], st["rows"], st["reference_ms"],
                          st.get("grouped_ms"), st.get("speedup"), st.get("max_rel_err")]])
    st = stages.get("zero_offload", {})
    if st.get("rows") or st.get("eight_b_skipped"):
        lines += ["", "## ZeRO optimizer offload", ""]
        lines += _table(["shape", "mode", "seq", "ok", "step s", "tokens/s", "peak GiB"],
                        [[r.get("shape"), r.get("mode"), r.get("seq"), r.get("ok"), r.get("step_s"), r.get("tokens_per_s"),
                          r.get("peak_mem_gib")] for r in st.get("rows", []) if "largest_shape_that_trains" not in r])
        if st.get("eight_b_skipped"):
            lines += ["", f"8B offload: skipped ({st['eight_b_skipped']})"]
    st = stages.get("eight_b", {})
    if st.get("rows"):
        lines += ["", f"## Llama-3.1-8B, one GPU ({st.get('recipe')} at reduced depth, host {st.get('host_gib')} GiB)", ""]
        lines += _table(["layers", "seq", "planned GiB", "measured GiB", "peak ratio", "planned host GiB", "step s",
                         "note"],
                        [[r["layers"], _k(r["seq"]), r.get("planned_gib"), r.get("peak_gib"), r.get("peak_ratio"),
                          r.get("planned_host_gib"), r.get("step_s"), r.get("skipped") or r.get("error") or ""]
                         for r in st["rows"]])
    if result.get("targets"):
        lines += ["", "## Targets", ""]
        lines += _table(["target", "value", "goal", "pass"],
                        [[n, t["value"], t["target"], "yes" if t["passed"] else "NO"] for n, t in result["targets"].items()])
    return "\n".join(lines) + "\n"
