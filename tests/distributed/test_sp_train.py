"""Sequence-parallel training equals single-process training on the same global batch (gloo, CPU).

Each layout runs the real Trainer in spawned gloo processes on the tiny recipe's passkey data
(packed documents whose boundaries fall anywhere, so inside shards and ring blocks): the summed
parameter gradients of the first step and the loss curve of three steps must match a single
process that sees the same global batch.

Tolerance: fp32 on CPU; the layouts only change summation order (blockwise softmax merges, split
reductions): support/parity.py's error model, while a wrong mask, a lost shard edge or a double
normalisation moves them by 1e-2 or more.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support.harness import dist_info, run_ranks
from support.helpers import SMALL, compose_cfg
from support.parity import assert_same_curve, assert_same_grads, assert_scalar, STEP1_RTOL

GQA = ["model.num_heads=4", "model.num_kv_heads=2"]
MHA = ["model.num_heads=4", "model.num_kv_heads=4"]
# Two head chunks pipelined through the Ulysses all-to-alls, under activation checkpointing (the
# recomputation replays the chunked all-to-alls inside the backward).
MHA_PIPE = MHA + ["parallel.sp.ulysses_chunks=2", "memory.checkpointing=true"]
MODEL_IDS = {id(GQA): "gqa", id(MHA): "mha", id(MHA_PIPE): "mha-chunks2-ckpt"}



def _worker(rank, world, overrides):
    from longtrain.trainer.loop import Trainer

    cfg = compose_cfg(overrides)
    trainer = Trainer(cfg, dist_info())
    loss, _ = trainer.forward_backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.fit()
    if rank == 0:
        lines = (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
        return loss, grads, [json.loads(x) for x in lines]


def run_layout(tmp_path, name, world, overrides):
    common = SMALL + [f"run.dir={tmp_path / name}", f"data.cache_dir={tmp_path.parent / 'sp_cache'}",
                      "trainer.max_steps=3", "checkpoint.save_final=false"]
    # Joined as the trainer joins (init_distributed); one rank runs with no process group.
    return run_ranks(_worker, world, common + list(overrides), init="longtrain", require_group=False)[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("sp")
    cache = {}

    def get(model):
        key = tuple(model)
        if key not in cache:
            cache[key] = run_layout(base, f"ref{len(cache)}", 1, list(model) + ["data.micro_batch_size=1"])
        return cache[key]
    return base, get


LAYOUTS = [  # (world, ulysses, ring, model); the 2-rank GQA layouts are in the parity slice of .ci/run
    pytest.param(2, 2, 1, GQA, marks=pytest.mark.parity), (4, 4, 1, GQA), pytest.param(2, 1, 2, GQA, marks=pytest.mark.parity), (4, 1, 4, GQA), (4, 2, 2, GQA),
    (4, 2, 1, GQA), (4, 1, 2, GQA),  # dp 2 x ulysses 2, dp 2 x ring 2
    (4, 2, 2, MHA), (4, 4, 1, MHA),
    (2, 2, 1, MHA_PIPE), (4, 2, 2, MHA_PIPE),
]


@pytest.mark.parametrize("world, ulysses, ring, model", LAYOUTS,
                         ids=[f"w{w}-u{u}-r{r}-{MODEL_IDS[id(m)]}" for w, u, r, m in
                              (getattr(c, "values", c) for c in LAYOUTS)])
def test_layout_matches_single_process(reference, world, ulysses, ring, model):
    base, get = reference
    ref_loss, ref_grads, ref_metrics = get(model)
    name = f"w{world}u{ulysses}r{ring}{MODEL_IDS[id(model)]}"
    loss, grads, metrics = run_layout(base, name, world, list(model) + [
        f"parallel.sp.ulysses={ulysses}", f"parallel.sp.ring={ring}", "data.micro_batch_size=1"])
    assert_scalar(loss, ref_loss, STEP1_RTOL, "loss", 1)
    assert_same_grads(grads, ref_grads)
    assert_same_curve(metrics, ref_metrics, keys=("loss",))
    assert all(m["sp_bytes_sent"] > 0 and 0 <= m["sp_comm_frac"] < 1 for m in metrics)
    assert metrics[0]["tokens_per_rank"] * world == metrics[0]["tokens"]


def _grid_worker(rank, world, overrides):
    from longtrain.trainer.loop import Trainer

    cfg = compose_cfg(overrides)
    trainer = Trainer(cfg, dist_info())
    trainer.fit()
    if rank == 0:
        return json.loads((Path(cfg.run.dir) / "needle.json").read_text())


@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_needle_grid_beyond_the_training_length(tmp_path, ulysses, ring):
    # The grid at 1x and 2x the training length under sequence parallelism (ring attention takes rows
    # of a whole multiple of the length it was built for) scores the same keys as one process. The
    # weights are equal up to fp32 reordering, so the argmax agrees but for near ties: the whole-key
    # grid must match and the per-digit one within one of the 10 digits of a cell (2 keys x 5 digits).
    grid = GQA + ["trainer.max_steps=2", "trainer.eval_every=2", "data.passkey.grid_lengths=[1,2]",
                  "data.passkey.grid_samples=2", "data.passkey.depths=2", "data.micro_batch_size=1",
                  f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.save_final=false"]
    ref = run_ranks(_grid_worker, 1, SMALL + grid + [f"run.dir={tmp_path / 'one'}"], init="longtrain",
                    require_group=False)[0]
    got = run_ranks(_grid_worker, 2, SMALL + grid + [f"run.dir={tmp_path / 'sp'}", f"parallel.sp.ulysses={ulysses}",
                                                     f"parallel.sp.ring={ring}"], init="longtrain",
                    require_group=False)[0]
    assert got["lengths"] == ref["lengths"] == [256, 512] and got["depths"] == ref["depths"] == [0.0, 1.0]
    assert got["acc"] == ref["acc"]
    for mine, theirs in zip(got["digit_acc"], ref["digit_acc"]):
        assert mine == pytest.approx(theirs, abs=0.1)
