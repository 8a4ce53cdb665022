"""Training with StreamBP equals training without it (gloo, CPU): single process, Ulysses 2, ring 2,
ZeRO 1/2/3 on dp 2 and ZeRO-3 with Ulysses 2, against one process without StreamBP on the same
global batch. Under ZeRO-2 each parameter's gradient is reduced once per backward and under ZeRO-3
each layer's parameters are gathered once for its forward and once for its streamed backward,
whatever the number of chunks (both counted).

Tolerance as in test_zero.py: fp32, only the summation order changes (per-chunk weight gradients,
split K/V gradients), ~1e-7 relative per op; 1e-5 on losses and gradient norms, 1e-4 relative (atol
1e-6) on the first step's gradients. A dropped chunk or key prefix moves them by 1e-2 or more.
The chunk size (48 tokens) divides neither the 256-token sequence nor the 128-token shards.
"""
from __future__ import annotations

import os

import pytest
import torch

from test_zero import _full_grads, assert_same_curve, common, run_jobs

SBP = ["memory.streambp.enabled=true", "memory.streambp.chunk_size=48"]


def _count_zero2_reductions(trainer):
    """Count ZeRO-2's per-parameter gradient reductions (the hook DeepSpeed fires as gradients arrive)."""
    opt = trainer.engine.optimizer
    counts = {}
    real = opt.reduce_ready_partitions_and_remove_grads

    def counting(param, i):
        counts[id(param)] = counts.get(id(param), 0) + 1
        return real(param, i)
    opt.reduce_ready_partitions_and_remove_grads = counting
    return counts


def _count_zero3_gathers(restore: bool = False):
    """Count ``deepspeed.zero.GatheredParameters`` contexts (StreamBP's per-layer gathers under ZeRO-3)."""
    import deepspeed
    real = getattr(deepspeed.zero, "_real_gathered", deepspeed.zero.GatheredParameters)
    if restore:
        deepspeed.zero.GatheredParameters = real
        return None
    counts = {"n": 0}

    def counting(*args, **kwargs):
        counts["n"] += 1
        return real(*args, **kwargs)
    deepspeed.zero._real_gathered = real
    deepspeed.zero.GatheredParameters = counting
    return counts


def _worker(rank, world, port, jobs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import json
    from pathlib import Path

    from longtrain.parallel.distributed import destroy_distributed, init_distributed
    from longtrain.trainer.loop import Trainer
    from test_train import compose_cfg

    dist_info = init_distributed("cpu", "gloo", 300, require_group=True)
    for name, overrides in jobs:
        cfg = compose_cfg(overrides)
        trainer = Trainer(cfg, dist_info)
        counts = _count_zero2_reductions(trainer) if cfg.zero.stage == 2 else None
        gathers = _count_zero3_gathers() if cfg.zero.stage == 3 else None
        result = {"streamed": trainer.model.streambp_chunk}
        result["loss"], _ = trainer.forward_backward()
        if counts is not None:  # one reduction per parameter per backward (2 micro-batches), not per chunk
            result["reductions"] = sorted(set(counts.values())), len(counts)
            counts.clear()
        if gathers is not None:  # per layer and micro-batch: one gather for the forward, one for the backward
            result["gathers"] = gathers.pop("n"), cfg.model.num_layers * trainer.grad_accum
            _count_zero3_gathers(restore=True)
        result["grads"] = _full_grads(trainer)
        trainer.fit()
        if rank == 0:
            lines = (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
            result["metrics"] = [json.loads(x) for x in lines]
            out[name] = result
    destroy_distributed()


def _run(world, jobs):
    import torch.multiprocessing as mp

    from dist_utils import free_port
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), jobs, out), nprocs=world)
        return dict(out)


def _check(got, ref):
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for n, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert_same_curve(got["metrics"], ref["metrics"])


def test_streambp_training_matches_plain_backprop(tmp_path):
    ref, single = (lambda r: (r["ref"], r["sbp"]))(_run(1, [
        ("ref", common(tmp_path, "ref") + ["checkpoint.save_final=false"]),
        ("sbp", common(tmp_path, "sbp") + SBP + ["checkpoint.save_final=false"])]))
    assert ref["streamed"] is None and single["streamed"] == 48
    _check(single, ref)
    layouts = {"u2": ["parallel.sp.ulysses=2"], "r2": ["parallel.sp.ring=2"], "dp2-zero1": ["zero.stage=1"],
               "dp2-zero2": ["zero.stage=2"], "dp2-zero3": ["zero.stage=3"],
               "u2-zero3": ["zero.stage=3", "parallel.sp.ulysses=2"]}
    results = _run(2, [(name, common(tmp_path, name) + SBP + extra + ["checkpoint.save_final=false"])
                       for name, extra in layouts.items()])
    for name in layouts:
        assert results[name]["streamed"] == 48, name
        _check(results[name], ref)
    for name in ("dp2-zero3", "u2-zero3"):
        gathers, layer_passes = results[name]["gathers"]
        assert gathers == 2 * layer_passes, (name, gathers, layer_passes)
    counts, num_params = results["dp2-zero2"]["reductions"]
    assert counts == [2] and num_params == len(ref["grads"])  # 2 micro-batches per step on dp 2


def test_streambp_config_errors():
    from test_train import cli
    for override, expected in [("memory.checkpointing=true", "memory.streambp.enabled"),
                               ("zero.stage=3 parallel.sp.ring=2", "memory.streambp.enabled")]:
        proc = cli("memory.streambp.enabled=true", *override.split(), "logging.progress=false")
        assert proc.returncode == 2 and expected in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]
    proc = cli("memory.offload_checkpoints=true")
    assert proc.returncode == 2 and "memory.offload_checkpoints" in proc.stderr.strip().splitlines()[-1]
    proc = cli("memory.streambp.enabled=true", "memory.streambp.chunk_size=0")
    assert proc.returncode == 2 and "memory.streambp.chunk_size" in proc.stderr.strip().splitlines()[-1]
