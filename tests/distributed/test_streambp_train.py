"""Training with StreamBP equals training without it (gloo, CPU): single process, Ulysses 2, ring 2,
ZeRO 1/2/3 on dp 2 and ZeRO-3 with Ulysses 2 and ring 2 (and, slow, ZeRO-3 with the parameters and
the optimizer offloaded on dp 2, Ulysses 2, ring 2 and Ulysses 2 x ring 2), against one process
without StreamBP on the same global batch. Under ZeRO-2 each parameter's gradient is reduced once per backward and under ZeRO-3
each layer's parameters are gathered once for its forward and once for its streamed backward,
whatever the number of chunks (both counted).

Tolerance: support/parity.py (fp32, only the summation order changes: per-chunk weight gradients,
split K/V gradients). A dropped chunk or key prefix moves them by 1e-2 or more.
The chunk size (48 tokens) divides neither the 256-token sequence nor the 128-token shards.
"""
from __future__ import annotations

import pytest

from support.harness import run_jobs
from support.helpers import common
from support.parity import assert_same_curve, assert_same_step1

SBP = ["memory.streambp.enabled=true", "memory.streambp.chunk_size=48"]


_COUNTS: dict = {}


def _count(trainer) -> None:
    """Before the first step: count ZeRO-2's per-parameter gradient reductions (the hook DeepSpeed fires
    as gradients arrive) and ZeRO-3's ``GatheredParameters`` contexts (StreamBP's per-layer gathers)."""
    import deepspeed
    _COUNTS.clear()
    stage = trainer.cfg.zero.stage
    if stage == 2:
        opt = trainer.engine.ds.optimizer
        real_reduce = opt.reduce_ready_partitions_and_remove_grads

        def counting_reduce(param, i):
            _COUNTS[id(param)] = _COUNTS.get(id(param), 0) + 1
            return real_reduce(param, i)
        opt.reduce_ready_partitions_and_remove_grads = counting_reduce
    if stage == 3:
        real_gathered = getattr(deepspeed.zero, "_real_gathered", deepspeed.zero.GatheredParameters)
        deepspeed.zero._real_gathered = real_gathered

        def counting_gathered(*args, **kwargs):
            _COUNTS["gathers"] = _COUNTS.get("gathers", 0) + 1
            return real_gathered(*args, **kwargs)
        deepspeed.zero.GatheredParameters = counting_gathered


def _probe(trainer, result) -> None:
    """After the first step's backward: what :func:`_count` counted, and whether StreamBP was on."""
    import deepspeed
    result["streamed"] = getattr(trainer.model.layers[0], "streambp_chunk", None)
    stage = trainer.cfg.zero.stage
    if stage == 2:  # one reduction per parameter per backward (micro-batch), not per chunk
        result["reductions"] = sorted(set(_COUNTS.values())), len(_COUNTS)
        trainer.engine.ds.optimizer.__dict__.pop("reduce_ready_partitions_and_remove_grads")
    if stage == 3:  # per layer and micro-batch: one gather for the forward, one for the backward
        result["gathers"] = _COUNTS.get("gathers", 0), trainer.cfg.model.num_layers * trainer.grad_accum
        deepspeed.zero.GatheredParameters = deepspeed.zero._real_gathered
    _COUNTS.clear()


def _jobs(tmp, layouts):
    return [(name, common(tmp, name) + extra + ["checkpoint.save_final=false"],
             {"grads": True, "setup": _count, "probe": _probe}) for name, extra in layouts.items()]


def _check(got, ref):
    assert_same_step1(got, ref)
    assert_same_curve(got["metrics"], ref["metrics"])


@pytest.mark.parity
def test_streambp_training_matches_plain_backprop(tmp_path):
    singles = run_jobs(1, _jobs(tmp_path, {"ref": [], "sbp": SBP}))
    ref = singles["ref"]
    assert ref["streamed"] is None and singles["sbp"]["streamed"] == 48
    _check(singles["sbp"], ref)
    layouts = {"u2": ["parallel.sp.ulysses=2"], "r2": ["parallel.sp.ring=2"], "dp2-zero1": ["zero.stage=1"],
               "dp2-zero2": ["zero.stage=2"], "dp2-zero3": ["zero.stage=3"],
               "u2-zero3": ["zero.stage=3", "parallel.sp.ulysses=2"], "r2-zero3": ["zero.stage=3", "parallel.sp.ring=2"]}
    results = run_jobs(2, _jobs(tmp_path, {name: SBP + extra for name, extra in layouts.items()}))
    for name in layouts:
        assert results[name]["streamed"] == 48, name
        _check(results[name], ref)
    for name in ("dp2-zero3", "u2-zero3", "r2-zero3"):  # once per forward, once per streamed backward
        gathers, layer_passes = results[name]["gathers"]
        assert gathers == 2 * layer_passes, (name, gathers, layer_passes)
    counts, num_params = results["dp2-zero2"]["reductions"]
    assert counts == [2] and num_params == len(ref["grads"])  # 2 micro-batches per step on dp 2


ZERO3_OFFLOAD = ["zero.stage=3", "zero.offload_params=cpu", "zero.offload_optimizer=cpu"]
"""ZeRO-3 with the parameters and the optimizer in host memory (the one-GPU layout for an 8B model)."""


@pytest.mark.slow
def test_streambp_with_zero3_parameter_and_optimizer_offload_matches_plain_backprop(tmp_path):
    """ZeRO-3 Offload (parameters and optimizer on the host, DeepSpeed's CPU Adam) under StreamBP,
    with and without the layer inputs offloaded, on dp 2, Ulysses 2, ring 2 and Ulysses 2 x ring 2,
    equals one process without either (about a minute: slow)."""
    ref = run_jobs(1, _jobs(tmp_path, {"ref": []}))["ref"]
    off = SBP + ["memory.offload_checkpoints=true"]
    two = {"dp2": SBP + ZERO3_OFFLOAD, "u2-offload": off + ZERO3_OFFLOAD + ["parallel.sp.ulysses=2"],
           "r2-offload": off + ZERO3_OFFLOAD + ["parallel.sp.ring=2"]}
    four = {"u2xr2": SBP + ZERO3_OFFLOAD + ["parallel.sp.ulysses=2", "parallel.sp.ring=2"]}
    results = {**run_jobs(2, _jobs(tmp_path, two)), **run_jobs(4, _jobs(tmp_path, four))}
    for name, result in results.items():
        assert result["streamed"] == 48, name
        _check(result, ref)


def test_streambp_config_errors():
    from support.helpers import cli
    for override, expected in [("memory.checkpointing=true", "memory.streambp.enabled")]:
        proc = cli("memory.streambp.enabled=true", *override.split(), "logging.progress=false")
        assert proc.returncode == 2 and expected in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]
    proc = cli("memory.offload_checkpoints=true")
    assert proc.returncode == 2 and "memory.offload_checkpoints" in proc.stderr.strip().splitlines()[-1]
    proc = cli("memory.streambp.enabled=true", "memory.streambp.chunk_size=0")
    assert proc.returncode == 2 and "memory.streambp.chunk_size" in proc.stderr.strip().splitlines()[-1]
