"""The planner (longtrain.plan): one training step on fake tensors against the same step run for real.

Proofs (tiny shapes, CPU):
- the planned peak of live tensor bytes, and its split into parameters / gradients / optimizer state /
  the rest, equal the measured ones of the real step (same tracker on real tensors) within 2%, for
  the plain path, activation checkpointing, StreamBP and StreamBP + offload (on the CPU, offload
  keeps the tensor as is, so the plan equals StreamBP's) and under bf16 autocast;
- the counted FLOPs equal ModelArgs.flops_per_token where that formula is exact: no recomputation
  (no checkpointing or StreamBP), fp32, one document per row; the formula then differs from the
  count only by its ``6 x`` the norm weights (parameters that are not matmul weights);
- the command line prints a table, ``--json`` parses, and bad input gives one line and exit 2.
"""
from __future__ import annotations

import json

import pytest

from longtrain.config import register_configs
from longtrain.plan import get_gpu, run_step
from longtrain.plan.cli import SEQ_MULTIPLE, main, max_seq
from longtrain.precheck import compose_config
from longtrain.trainer.build import build_model_args

SMALL = ["data.seq_len=256", "data.micro_batch_size=1", "data.global_batch_size=2"]
FEATURES = {
    "plain": [],
    "checkpointing": ["memory.checkpointing=true"],
    "streambp": ["memory.streambp.enabled=true", "memory.streambp.chunk_size=64"],
    "streambp_offload": ["memory.streambp.enabled=true", "memory.streambp.chunk_size=64",
                         "memory.offload_checkpoints=true"],
    "bf16_checkpointing": ["memory.checkpointing=true", "trainer.precision=bf16"],
}


def _cfg(overrides):
    register_configs()
    return compose_config([*SMALL, *overrides])


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_planned_peak_equals_measured(feature):
    cfg = _cfg(FEATURES[feature])
    planned, measured = run_step(cfg, fake=True), run_step(cfg, fake=False)
    assert planned.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.02)
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert getattr(planned, key) == getattr(measured, key)
    assert planned.activations_at_peak == pytest.approx(measured.activations_at_peak, rel=0.02)
    assert planned.flops == measured.flops
    # the split adds up: parameters, gradients and optimizer state are all alive at a backward peak
    assert planned.peak_bytes >= planned.params_bytes + planned.optimizer_bytes


def test_memory_features_lower_the_peak():
    peaks = {f: run_step(_cfg(FEATURES[f])).peak_bytes for f in ("plain", "checkpointing", "streambp")}
    assert peaks["streambp"] < peaks["checkpointing"] < peaks["plain"]


def test_counted_flops_equal_formula_without_recomputation():
    cfg = _cfg([])
    plan = run_step(cfg)
    args = build_model_args(cfg.model)  # the recipe's geometry (the tiny recipe has its own layer count)
    norm_weights = args.num_layers * 2 * args.hidden_size + args.hidden_size
    assert plan.flops == plan.formula_flops - 6 * norm_weights * plan.tokens
    # checkpointing recomputes each layer's forward: more FLOPs counted than the model's
    assert run_step(_cfg(FEATURES["checkpointing"])).flops > plan.flops


def test_gpu_target_plans_bf16_with_roofline():
    plan = run_step(_cfg(FEATURES["streambp_offload"]), get_gpu("h100"))
    assert plan.precision == "bf16" and plan.host_bytes > 0
    assert plan.time_s >= max(plan.compute_s, plan.memory_s) > 0
    assert 0 < plan.mfu < 1 and plan.tokens_per_s > 0


def test_max_seq_is_the_boundary():
    cfg = _cfg([])
    gpu = get_gpu("h100")
    tiny_gpu = type(gpu)("test", 40 << 20, gpu.bf16_flops, gpu.hbm_bytes_per_s)
    longest, plan = max_seq(cfg, tiny_gpu)
    assert longest % SEQ_MULTIPLE == 0 and longest >= SEQ_MULTIPLE
    assert plan.peak_bytes <= tiny_gpu.memory_bytes
    from longtrain.plan.cli import with_seq
    assert run_step(with_seq(cfg, longest + SEQ_MULTIPLE), tiny_gpu).peak_bytes > tiny_gpu.memory_bytes


def test_cli_table_and_json(capsys):
    assert main([*SMALL, "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "peak device memory" in out and "MFU" in out and "step time: no overlap / overlapped" in out
    assert main([*SMALL, "--json", "--gpu=a100"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpu"]["name"] == "a100" and doc["fits"] is True and doc["plan"]["peak_bytes"] > 0


@pytest.mark.parametrize("argv, words", [
    (["--gpu", "v100"], "unknown GPU 'v100'"),
    (["parallel.sp.ulysses=3"], "parallel.sp"),
    (["model.vocab_size=1000000000", "--gpu", "a100", "--max-seq"], "not even data.seq_len"),
    (["--frobnicate"], "not a flag of longtrain-plan"),
    (["--world-size", "0"], "--world-size: '0' is not a positive integer"),
    (["parallel.sp.ulysses=2", "--world-size", "3"], "does not divide the world size 3"),
    (["--interconnect", "intra=fast"], "--interconnect: intra=fast must be a positive number"),
    (["--interconnect", "nvlink=900"], "--interconnect: 'nvlink=900' is not one of"),
    (["--sweep", "--max-seq"], "--sweep and --max-seq: choose one"),
    (["run.dir=/sys/longtrain-run"], "run.dir: cannot"),  # sysfs refuses mkdir, even to root
])
def test_cli_bad_input_one_line_exit_2(capsys, argv, words):
    assert main([*SMALL, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longtrain: error: ") and words in err[0]


def test_collectives_and_links():
    """Bytes per collective follow the ring formulas; a group that crosses nodes runs at the network's
    bandwidth, so the same plan takes longer when every GPU is its own node."""
    from longtrain.plan.comm import parse_interconnect

    cfg = _cfg(["parallel.sp.ulysses=2"])
    gpu = get_gpu("h100")
    plan = run_step(cfg, gpu, world_size=4)
    rows = {(c["axis"], c["kind"]): c for c in plan.comm}
    grads = plan.grads_bytes
    # gradients are summed over every rank (dp x sp = 4): an all-reduce sends 2 (n-1)/n of them
    assert rows[("dp_sp", "all_reduce")]["bytes_sent"] == pytest.approx(2 * 3 / 4 * grads, rel=0.01)
    assert rows[("ulysses", "all_to_all")]["count"] > 0 and all(c["link"] == "intra" for c in plan.comm)
    split = run_step(cfg, gpu, world_size=4, net=parse_interconnect("gpus_per_node=1", "h100"))
    assert all(c["link"] == "inter" for c in split.comm)
    assert split.comm_s == pytest.approx(plan.comm_s * 450 / 50, rel=1e-6)
    assert split.time_serial_s > plan.time_serial_s and plan.time_overlap_s <= plan.time_serial_s
    assert plan.tokens_per_s == pytest.approx(plan.tokens * 2 / plan.time_s)  # dp = 2 replicas


def test_flash_flops_count_the_visible_pairs():
    """The varlen flash ops count 4 x heads x head_dim FLOPs per visible (query, key) pair forward and
    twice that backward; bottom-right causal alignment hides the upper triangle of the last queries."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from longtrain.plan.flops import _visible_pairs
    from longtrain.plan.tracker import StepTracker

    assert _visible_pairs(4, 6, causal=True) == 4 * 6 - 6  # query i sees keys 0 .. i + 2
    assert _visible_pairs(4, 4, causal=True) == 10 and _visible_pairs(4, 6, causal=False) == 24
    assert _visible_pairs(6, 4, causal=True) == 10  # the first two queries see nothing
    cu_q, cu_k = torch.tensor([0, 4, 8], dtype=torch.int32), torch.tensor([0, 6, 10], dtype=torch.int32)
    with FakeTensorMode(allow_non_fake_inputs=True), StepTracker(989e12, 3.35e12, fake=True) as tracker:
        q = torch.empty(8, 4, 64, dtype=torch.bfloat16)
        k = torch.empty(10, 2, 64, dtype=torch.bfloat16)
        out = torch.ops.aten._flash_attention_forward(q, k, k, cu_q, cu_k, 4, 6, 0.0, True, False, scale=0.125)
        forward = tracker.flops
        torch.ops.aten._flash_attention_backward(q, q, k, k, out[0], out[1], cu_q, cu_k, 4, 6, 0.0, True,
                                                 out[2], out[3], scale=0.125)
    assert forward == 4 * 4 * 64 * (18 + 10)
    assert tracker.flops == 3 * forward
    # the backward's workspace (fp32 dQ accumulator, GQA-expanded dK/dV) counts at the peak
    assert tracker.workspace_peak > 2 * 10 * 4 * 64 * 2


def test_a_ulysses_chunks_flash_calls_copy_no_keys_and_expand_no_heads(monkeypatch):
    """Under Ulysses a StreamBP chunk holds the same local positions of every rank: several query
    runs, each seeing a key prefix from token 0, which overlap. One varlen call gathers every run's
    keys (copies, several times the prefix) and its GQA backward expands dK/dV of them to every query
    head (tiny: 4 query / 2 KV heads, 2 / 1 per rank); one call per run on views of the keys, and per
    query head of each KV group in the backward, makes neither: the same FLOPs, a smaller workspace
    and peak (kernels/fused.py, SEGMENT_CALLS; the emulated ops check their numerics)."""
    from longtrain.kernels import fused

    cfg = _cfg(["data.seq_len=4096", "memory.streambp.enabled=true", "memory.streambp.chunk_size=512",
                "parallel.sp.ulysses=2"])
    per_run = run_step(cfg, get_gpu("h100"), world_size=2)
    monkeypatch.setattr(fused, "SEGMENT_CALLS", 0)
    one_call = run_step(cfg, get_gpu("h100"), world_size=2)
    assert per_run.flops == one_call.flops
    assert per_run.largest_by_key["workspace"] < one_call.largest_by_key["workspace"] / 2
    assert per_run.peak_bytes < one_call.peak_bytes


def test_gpu_target_streams_attention_through_the_fused_kernels():
    """Under a GPU target StreamBP's chunks attend through the flash varlen stand-in (as CUDA
    training does), never through the reference kernels' dense score tile."""
    from longtrain.kernels.dispatch import KERNEL_STATS

    seq, chunk = 4096, 512
    cfg = _cfg(["data.seq_len=4096", "memory.streambp.enabled=true", f"memory.streambp.chunk_size={chunk}"])
    before = dict(KERNEL_STATS.calls)
    plan = run_step(cfg, get_gpu("h100"))
    assert KERNEL_STATS.calls["flash"] > before["flash"]
    assert all(KERNEL_STATS.calls[p] == before[p] for p in ("reference", "fallback", "cudnn", "cpu"))
    args = build_model_args(cfg.model)
    score_tile = chunk * seq * args.num_heads * 4
    assert plan.largest_transient < score_tile
    assert plan.flops > 0 and plan.precision == "bf16"
    checkpointing = run_step(_cfg(["data.seq_len=4096", "memory.checkpointing=true"]), get_gpu("h100"))
    assert plan.peak_bytes < checkpointing.peak_bytes


def test_peak_breakdown_lists_the_largest_tensors(capsys):
    plan = run_step(_cfg(FEATURES["checkpointing"]))
    sizes = [t["bytes"] for t in plan.peak_tensors]
    assert sizes == sorted(sizes, reverse=True) and len(sizes) > 3
    assert {t["kind"] for t in plan.peak_tensors} <= {"params", "grads", "optimizer", "buffers", "other"}
    parts = plan.params_bytes + plan.optimizer_bytes
    assert plan.extra["peak_params"] + plan.extra["peak_optimizer"] == parts  # both alive all along
    assert main([*SMALL, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["peak_tensors"][0]["op"] and "buffers_bytes" in doc["plan"]


def test_long_chunk_is_the_chunk_auto_takes_past_the_sequence_cap():
    """--max-seq probes past the chunk StreamBP takes at long lengths: ``auto`` caps the chunk at a
    short sequence, so the chunk of the first (short) plan would put the probes where the peak is
    not yet on its line."""
    from longtrain.plan.step import long_chunk

    cfg = _cfg(["memory.streambp.enabled=true", "memory.streambp.chunk_size=auto"])
    gpu = get_gpu("h100")
    assert long_chunk(cfg, gpu, True, 256) == 256
    assert long_chunk(cfg, gpu, True, 1 << 24) > 256 and long_chunk(_cfg([]), gpu, True, 1 << 24) is None
