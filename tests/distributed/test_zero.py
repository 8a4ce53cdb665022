"""ZeRO through DeepSpeed equals single-process training, on every layout (gloo, CPU).

Each layout runs the real Trainer in spawned gloo processes, one process group per layout, and
within it ZeRO stages 0 (the plain path), 1, 2 and 3 one after the other on the tiny recipe's
passkey data. For every stage, the summed first-step gradients (gathered from DeepSpeed's shards
with ``safe_get_full_grad``), and the loss, gradient norm and learning rate of three steps must
match one process that sees the same global batch.

Tolerance: fp32 on CPU; layouts and stages change only the summation order (split reductions,
flat buckets, blockwise softmax merges): support/parity.py's error model (the first step at 1e-5 on
the loss and gradient norm, 1e-4 relative, atol 1e-6, on gradients; later steps at 1e-4, where AdamW
amplifies the reordering). A wrong gradient scale (averaged
over dp or over the world size, or divided by the accumulation steps) moves the gradient norm by a
factor of 2 or more; the loss curve alone would hide it (Adam is scale-invariant until clipping).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from support.harness import run_jobs
from support.helpers import cli, common
from support.parity import assert_same_curve, assert_same_step1, assert_tensors

STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    ref = run_jobs(1, [("ref", common(tmp, "ref") + ["checkpoint.save_final=true"], {"grads": True})])["ref"]
    return tmp, ref


LAYOUTS = [  # (world, ulysses, ring); the 4-rank layout takes ~50 s on 2 cores: slow
    pytest.param(2, 1, 1, marks=pytest.mark.parity), (2, 2, 1), pytest.param(2, 1, 2, marks=pytest.mark.parity),
    pytest.param(4, 2, 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("world, ulysses, ring", LAYOUTS, ids=["dp2-u1-r1", "dp1-u2-r1", "dp1-u1-r2", "dp2-u2-r1"])
def test_every_stage_matches_single_process(reference, world, ulysses, ring):
    tmp, ref = reference
    tag = f"w{world}u{ulysses}r{ring}"
    jobs = [(f"s{s}", common(tmp, f"{tag}s{s}") + [f"zero.stage={s}", f"parallel.sp.ulysses={ulysses}",
                                                   f"parallel.sp.ring={ring}", "checkpoint.save_final=false"],
             {"grads": True}) for s in STAGES]
    results = run_jobs(world, jobs)
    for s in STAGES:
        got = results[f"s{s}"]
        assert_same_step1(got, ref, f"stage {s}")
        assert_same_curve(got["metrics"], ref["metrics"])
        if s:
            report = json.loads((tmp / f"{tag}s{s}" / "memory_report.json").read_text())
            assert [r["rank"] for r in report] == list(range(world))
            for r in report:  # DeepSpeed pads partitions to an alignment: a few hundred bytes at most
                for key in ("params_device", "optimizer_device"):
                    assert r["measured"][key] == pytest.approx(r["expected"][key], rel=0.02, abs=4096), (s, key, r)
            ds_config = json.loads((tmp / f"{tag}s{s}" / "deepspeed_config.json").read_text())
            assert ds_config["zero_optimization"]["stage"] == s and ds_config["train_batch_size"] == 4


RESUME_BASE = ["zero.stage=2", "trainer.max_steps=4", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def stopped_run(reference):
    """Stage 2 on dp 2: an uninterrupted 4-step curve, and a run stopped at step 2 (its directory)."""
    tmp, _ = reference
    full = run_jobs(2, [("full", common(tmp, "full") + RESUME_BASE, {})])["full"]["metrics"]
    run_jobs(2, [("first", common(tmp, "split") + RESUME_BASE + ["trainer.stop_at_step=2"], {})])
    return tmp, full


def resume_as(tmp, name, overrides):
    shutil.copytree(tmp / "split", tmp / name)
    metrics = run_jobs(2, [(name, common(tmp, name) + RESUME_BASE + overrides, {})])[name]["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    return metrics


def test_resume_is_exact_and_survives_a_layout_change(stopped_run):
    """The stopped stage-2 dp-2 run resumes (a) as itself: exact (bitwise in practice, 1e-12 states
    intent); (b) as stage 1 on ulysses 2, re-sharded through DeepSpeed's universal checkpoint (fp32
    weights, Adam moments, step): it continues the uninterrupted curve within the fp32 reordering
    tolerance of the module docstring."""
    tmp, full = stopped_run
    assert_same_curve(full, resume_as(tmp, "same", []), rtol=1e-12)
    assert_same_curve(full[2:], resume_as(tmp, "to_s1", ["zero.stage=1", "parallel.sp.ulysses=2"])[2:])


@pytest.mark.slow
def test_resume_stage2_dp2_as_stage3_ulysses2(stopped_run):
    """Into ZeRO-3 on ulysses 2, through the universal checkpoint: steps 3 and 4 continue the
    uninterrupted curve at the reordering tolerance. Step 3 checks the restored weights, schedule
    and data order; step 4 the restored Adam state (moments, per-group hyper-parameters and step
    counts). DeepSpeed 0.19's ZeRO-3 universal load shares one step tensor between the two param
    groups, which AdamW then advanced twice per step (step 4 off by 2e-5 in loss, 1.4e-4 in gradient
    norm) until ``load_sharded`` gave each group its own counter."""
    tmp, full = stopped_run
    moved = resume_as(tmp, "to_s3", ["zero.stage=3", "parallel.sp.ulysses=2"])
    assert_same_curve(full[2:], moved[2:])


def test_hf_export_after_zero3_equals_unsharded_weights(reference):
    """ZeRO-3 on dp 2 x ulysses 2 (4 ranks), then export: the gathered HF weights equal the offline
    consolidation of the saved shards exactly, and the single-process run's weights within the
    reordering tolerance (3 AdamW steps of lr <= 2e-3 on gradients equal to 1e-4 relative)."""
    from safetensors.torch import load_file

    from longtrain.parallel.zero_checkpoint import consolidated_fp32

    tmp, _ = reference
    export = tmp / "hf3"
    run_jobs(4, [("z3", common(tmp, "z3") + ["zero.stage=3", "parallel.sp.ulysses=2"], {"export": str(export)})])
    exported = load_file(str(export / "model.safetensors"))
    shards = consolidated_fp32(tmp / "z3" / "checkpoints" / "step_00000003")
    unsharded = load_file(str(tmp / "ref" / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert set(exported) == set(unsharded) - {"lm_head.weight"} or set(exported) == set(unsharded)
    for name, tensor in exported.items():
        assert torch.equal(tensor, shards[name]), name
    assert_tensors(exported, {n: unsharded[n] for n in exported}, rtol=1e-4, atol=1e-5, what="weights after 3 steps")
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("overrides, expected", [
    (["zero.stage=4"], "zero.stage"),
    (["zero.stage=2", "zero.offload_params=cpu"], "zero.offload_params"),
    (["zero.offload_optimizer=cpu"], "zero.offload_optimizer"),
    (["zero.stage=1", "zero.offload_optimizer=nvme"], "zero.offload_optimizer"),
    (["zero.stage=2", "+zero.extra.train_batch_size=8"], "zero.extra.train_batch_size"),
    (["zero.stage=3", "+zero.extra.zero_optimization.reduce_scatter=false"], "zero.extra.zero_optimization.reduce_scatter"),
    (["zero.stage=2", "data.global_batch_size=6", "trainer.grad_accum=2"], "data.global_batch_size"),
])
def test_contradictions_fail_before_start(tmp_path, monkeypatch, overrides, expected):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the batch check knows the dp degree
    proc = cli(*overrides, f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
               "logging.progress=false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("longtrain: error: ") and expected in last, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists(), "nothing may start before the config is valid"


def test_deepspeed_config_from_typed_keys():
    from longtrain.config import ZeroConfig
    from longtrain.parallel.zero import deepspeed_config

    zc = ZeroConfig(stage=3, offload_optimizer="cpu", offload_params="cpu",
                    extra={"zero_optimization": {"stage3_max_live_parameters": 10**8}, "wall_clock_breakdown": True})
    cfg = deepspeed_config(zc, micro_batch_size=2, grad_accum=4, dp_size=8, bf16=True, clip_grad_norm=1.0)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (64, 2, 4)
    zo = cfg["zero_optimization"]
    assert zo["stage"] == 3 and zo["reduce_scatter"] is True and zo["stage3_max_live_parameters"] == 10**8
    assert zo["offload_optimizer"]["device"] == zo["offload_param"]["device"] == "cpu"
    assert cfg["bf16"] == {"enabled": True} and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["communication_data_type"] == "fp32" and cfg["wall_clock_breakdown"] is True
    assert "bf16" not in deepspeed_config(ZeroConfig(stage=1), 1, 1, 1, bf16=False, clip_grad_norm=0.0)


def test_expected_memory_is_the_zero_paper():
    """Psi = 7.5B on 64 ranks, the paper's figure 1 example with K = 12: 120 GB at stage 0 (with
    fp32 grads here: 135), 31.4 at stage 1, 16.6 at stage 2 and 1.9 at stage 3 (paper: 1.88 with
    fp16 grads; fp32 grads add 7.5e9 * 2 / 64)."""
    from longtrain.parallel.zero import expected_memory

    psi, gb = 7.5e9, 1e9

    def total(f):
        return (f.params_device + f.grads_device + f.optimizer_device) / gb

    assert total(expected_memory(psi, 1, 64, bf16=True)) == pytest.approx(2 * 7.5 + 4 * 7.5 + 12 * 7.5 / 64)
    assert total(expected_memory(psi, 2, 64, bf16=True)) == pytest.approx(2 * 7.5 + 16 * 7.5 / 64)
    assert total(expected_memory(psi, 3, 64, bf16=True)) == pytest.approx(18 * 7.5 / 64)
    assert total(expected_memory(psi, 0, 64, bf16=True)) == pytest.approx(16 * 7.5)  # plain: fp32 params, no master
    off = expected_memory(8e9, 2, 1, bf16=True, offload_optimizer=True)
    assert (off.params_device, off.grads_device, off.optimizer_device) == (16e9, 0.0, 0.0)
    assert (off.optimizer_host, off.grads_host) == (96e9, 32e9)
    p3 = expected_memory(70e9, 3, 16, bf16=True, offload_optimizer=True, offload_params=True)
    assert p3.params_device == 0 and p3.params_host == pytest.approx(2 * 70e9 / 16)


def _bf16_step(rank, world, stage):
    from longtrain.config import register_configs
    from longtrain.models import Transformer, get_model_args
    from longtrain.optim.loss import chunked_lm_loss
    from longtrain.optim.optimizer import build_optimizer
    from longtrain.parallel.dims import ParallelDims
    from longtrain.parallel.parallelize import parallelize
    from longtrain.precheck import compose_config

    register_configs()
    cfg = compose_config(["data.seq_len=64", f"zero.stage={stage}"])
    dims = ParallelDims(world_size=world, ulysses=1, ring=1)
    dims.build_groups()
    torch.manual_seed(0)
    model = Transformer(get_model_args("tiny", num_layers=2))
    model.init_weights()
    engine = parallelize(model, dims, cfg, build_optimizer(model, cfg.optim, torch.device("cpu")), grad_accum=1,
                         device=torch.device("cpu"), bf16=True)
    held = {str(getattr(p, "ds_tensor", p).dtype) for p in model.parameters()}
    ids = torch.randint(0, 384, (1, 64))
    batch = {"input_ids": ids, "position_ids": torch.arange(64)[None], "doc_ids": torch.zeros_like(ids)}
    loss = engine.forward(batch, lambda h, w: chunked_lm_loss(h, w, ids, chunk_size=32))
    engine.backward(loss)
    result = engine.step(float(loss))
    return held, str(loss.dtype), result.applied


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_trains_bf16_weights_at_every_stage(stage):
    """DeepSpeed's bf16 mode holds bf16 weights (fp32 masters in the optimizer) at every stage; ZeRO-3
    partitions the module it is given in the dtype it finds, so the engine casts it first."""
    from support.harness import run_ranks

    held, _, applied = run_ranks(_bf16_step, 1, stage, timeout=120)[0]
    assert held == {"torch.bfloat16"} and applied
