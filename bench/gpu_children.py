"""The work of the GPU suite's stages (bench/gpu_suite.py), each run in its own process so that an
out-of-memory error, a crash or a hang costs only that process. Every child prints one JSON line per
result as it comes, and stops starting new work at its deadline (a row saying what it skipped).

    python bench/gpu_children.py smoke|measure|baseline|moe|recipe '<json spec>'

- ``smoke``: the real trainer (``longtrain.train.run``) for ``steps`` steps per (memory mode,
  attention backend), the same seed and data: losses and gradient norms per step.
- ``measure``: ``bench/train_step.py``'s trial (forward, backward, AdamW; weights made on the device,
  AdamW's state primed) per configuration, one model per depth: step time and peak memory.
- ``baseline``: the HF baseline script's own trial (``--baseline``), its model made on the device.
- ``moe``: the experts' grouped GEMM forward + backward against the per-expert loop.
- ``recipe``: one trial of a recipe (at a reduced depth) through the real trainer: its peak and step time.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

MODES = {"none": [], "checkpointing": ["memory.checkpointing=true"], "streambp": ["memory.streambp.enabled=true"],
         "streambp_offload": ["memory.streambp.enabled=true", "memory.offload_checkpoints=true"]}
"""Memory modes as trainer overrides (the planner's and the smoke stage's)."""


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def train_into(row: dict, cfg, summarise) -> None:
    """Train ``cfg`` with the trainer (``longtrain.train.run``) and add to ``row`` ``ok=True`` and
    ``summarise(the records of its metrics.jsonl)``, or ``ok=False`` and what stopped it (out of
    memory, or the exception's first line)."""
    import torch

    from longtrain.train import run
    from longtrain.trainer.metrics import METRICS_FILE
    from longtrain.trainer.plots import read_metrics

    try:
        run(cfg)
        row.update(ok=True, **summarise(read_metrics(Path(cfg.run.dir) / METRICS_FILE)))
    except torch.OutOfMemoryError:
        row.update(ok=False, error="out of memory")
    except Exception as exc:  # noqa: BLE001 - reported in the row; the caller's next run still runs
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- smoke: the trainer on CUDA
def smoke_overrides(spec: dict, mode: str, backend: str, tmp: str) -> list:
    seq = spec["seq"]
    return [f"model.name={spec['shape']}", *([f"model.num_layers={spec['layers']}"] if spec.get("layers") else []),
            f"data.seq_len={seq}", "data.micro_batch_size=1", "data.global_batch_size=1", "data.mode=pretrain",
            # documents of 2-4 rows, split into rows of one document each (mostly): dense blocks, which
            # the cuDNN backend takes, as well as packed rows, which stay on flash
            "data.passkey.num_train=4", "data.passkey.num_eval=0", f"data.passkey.min_chars={2 * seq}",
            f"data.passkey.max_chars={4 * seq}", f"data.cache_dir={tmp}/cache", f"run.dir={tmp}/{mode}-{backend}",
            f"trainer.max_steps={spec['steps']}", f"trainer.device={spec['device']}", "trainer.eval_every=0",
            f"trainer.attention_backend={backend}", f"memory.streambp.chunk_size={spec['streambp_chunk']}",
            "checkpoint.save_final=false", "checkpoint.every=0", "logging.progress=false", *MODES[mode]]


def smoke(spec: dict) -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from longtrain.config import register_configs
    from longtrain.kernels.dispatch import KERNEL_STATS
    from longtrain.train import RECIPES_DIR

    register_configs()
    end = time.time() + spec["seconds"]
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        for mode, backend in spec["runs"]:
            row = dict(mode=mode, backend=backend)
            if time.time() > end:
                emit(dict(row, skipped="stage budget spent"))
                continue
            with initialize_config_dir(config_dir=RECIPES_DIR, version_base=None):
                cfg = OmegaConf.to_object(compose(config_name="tiny", overrides=smoke_overrides(spec, mode, backend,
                                                                                                 tmp)))
            t0, before = time.time(), dict(KERNEL_STATS.calls)
            train_into(row, cfg, lambda metrics: dict(loss=[m["loss"] for m in metrics],
                                                      grad_norm=[m["grad_norm"] for m in metrics],
                                                      peak_gib=max(m.get("peak_mem_gib", 0) for m in metrics)))
            row["kernel_calls"] = {p: KERNEL_STATS.calls[p] - before[p] for p in before if KERNEL_STATS.calls[p] > before[p]}
            row["seconds"] = round(time.time() - t0, 1)
            emit(row)
            free(torch.device(spec["device"]))


# ---------------------------------------------------------------------------- measure: train_step's trial
def measure(spec: dict) -> None:
    """``spec["trials"]``: dicts of shape, layers, mode, seq, streambp_chunk, loss_chunk, predicted_s (the
    planner's step time, or None); consecutive trials of one depth share a model."""
    import torch

    import train_step

    device = torch.device(spec["device"])
    end = time.time() + spec["seconds"]
    built, model = None, None
    for t in spec["trials"]:
        left = end - time.time()
        guess = (t.get("predicted_s") or 0.0) * spec.get("safety", 3.0) * spec.get("repeats", 1) + 5.0
        if guess > left:
            emit(dict(t, ok=None, skipped=f"predicted {guess:.0f} s (planned step x safety), {left:.0f} s left"))
            continue
        key = (t["shape"], t["layers"])
        if key != built:
            model = opt = None
            free(device)
            args, model, opt = train_step.build(t["shape"], device, t["layers"], spec.get("backend", "flash"))
            built = key
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()):  # train_step prints its own row: ours is richer
            row = train_step.trial(model, opt, args, t["mode"], t["seq"], spec.get("repeats", 1), device,
                                   t["loss_chunk"], t["streambp_chunk"])
        emit(dict(t, ok=row["ok"], step_s=row.get("step_s"), tokens_per_s=row.get("tokens_per_s"),
                  peak_gib=row.get("peak_gib"), seconds=round(time.time() - t0, 1)))
        free(device)


# ---------------------------------------------------------------------------- baseline: HF (+ Liger)
def baseline(spec: dict) -> None:
    import torch

    mod_spec = importlib.util.spec_from_file_location("hf_baseline", spec["script"])
    base = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(base)
    end = time.time() + spec["seconds"]
    with torch.device("cuda"):  # the weights made on the GPU: no CPU initialisation of the model
        model = base.build(spec["shape"], "sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for seq in spec["seqs"]:
        left = end - time.time()
        if seq > spec["seqs"][0] and left < spec.get("min_trial_s", 30):
            emit(dict(mode=spec["mode"], seq=seq, ok=None, skipped=f"{left:.0f} s left"))
            continue
        base.trial(model, opt, spec["shape"], spec["mode"], seq, spec.get("repeats", 2))


# ---------------------------------------------------------------------------- MoE grouped GEMM
def moe(spec: dict) -> None:
    import torch

    from longtrain.models.moe import Experts, use_grouped_mm

    device = torch.device(spec["device"])
    experts_n, hidden, inter, rows = (4, 32, 16, 64) if spec["dry_run"] else (128, 2048, 768, 65536)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        experts = Experts(experts_n, hidden, inter)
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
    emit(row)


# ---------------------------------------------------------------------------- recipe: one trainer step
def recipe(spec: dict) -> None:
    """One trial of ``spec["recipe"]`` through the trainer (``longtrain.train.run``): ``spec["steps"]``
    steps with ``spec["overrides"]`` (the depth, the length), data the recipe's own generator makes;
    the peak the trainer reports (``max_memory_allocated`` on CUDA) and the last step's time."""
    from longtrain.config import register_configs
    from longtrain.precheck import compose_config

    register_configs()
    row = dict(spec["trial"])
    with tempfile.TemporaryDirectory(prefix="gpu-recipe-") as tmp:
        seq = spec["seq"]
        cfg = compose_config(["--config-name", spec["recipe"], *spec["overrides"], f"run.dir={tmp}/run",
                              f"data.cache_dir={tmp}/cache", f"trainer.max_steps={spec['steps']}",
                              f"trainer.device={spec['device']}", "data.passkey.num_train=2", "data.passkey.num_eval=0",
                              f"data.passkey.min_chars={seq}", f"data.passkey.max_chars={2 * seq}",
                              "checkpoint.every=0", "checkpoint.save_final=false", "logging.progress=false",
                              "logging.wandb.mode=disabled"])
        t0 = time.time()

        def summarise(metrics):
            steps = [m for m in metrics if "step_time_s" in m]
            return dict(peak_gib=round(max(m["peak_mem_gib"] for m in steps), 3),
                        step_s=round(steps[-1]["step_time_s"], 3), tokens_per_s=round(steps[-1]["tokens_per_s"]))

        train_into(row, cfg, summarise)
        row["seconds"] = round(time.time() - t0, 1)
    emit(row)


CHILDREN = {"smoke": smoke, "measure": measure, "baseline": baseline, "moe": moe, "recipe": recipe}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]](json.loads(sys.argv[2]))
