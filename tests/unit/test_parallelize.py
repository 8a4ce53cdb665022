"""parallelize(): the written order with one log line per step, and a resume plan that only reads.

Single process, CPU. The step engines themselves are checked against one process on every
layout in test_zero.py and test_matrix.py; here only the composition contract is.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

from longtrain.config import Config
from longtrain.models import Transformer, get_model_args
from longtrain.optim.optimizer import build_optimizer
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.engine import PlainEngine
from longtrain.parallel.parallelize import parallelize
from longtrain.trainer.checkpoint import CheckpointManager
from longtrain.trainer.resume import plan_resume


def _model_and_cfg(**memory):
    cfg = Config()
    for key, value in memory.items():
        if key == "streambp":
            cfg.memory.streambp.enabled, cfg.memory.streambp.chunk_size = True, value
        else:
            setattr(cfg.memory, key, value)
    model = Transformer(get_model_args("tiny", num_layers=2))
    dims = ParallelDims(world_size=1, ulysses=1, ring=1)
    dims.build_groups()
    return model, dims, cfg


@pytest.mark.parametrize("memory, wrapper", [({}, "layer wrappers: none"),
                                             ({"checkpointing": True}, "activation checkpointing"),
                                             ({"streambp": 32, "checkpointing": True}, "StreamBP")])
def test_three_steps_in_order_one_line_each(caplog, memory, wrapper):
    model, dims, cfg = _model_and_cfg(**memory)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        engine = parallelize(model, dims, cfg, optimizer, grad_accum=1, device=torch.device("cpu"), bf16=False)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("longtrain")]
    assert len(lines) == 3, lines
    assert lines[0].startswith("sequence parallel: none")
    assert lines[1].startswith(wrapper), lines  # StreamBP wins over checkpointing, as before
    assert lines[2].startswith("step engine: plain torch")
    assert isinstance(engine, PlainEngine) and engine.loss_scale == 1.0 and engine.zero_stage == 0
    wrapped = {getattr(layer, "layer_wrapper", None) for layer in model.layers}
    assert wrapped == {None if not memory else ("Streamed" if "streambp" in memory else "Checkpointed")}


def test_plain_engine_sums_at_the_boundary_and_steps():
    """The plain engine's micro-batch contract: gradients accumulate over micro-batches, the step
    applies them once (finite) or drops them (non-finite loss) without touching the weights."""
    model, dims, cfg = _model_and_cfg()
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    engine = parallelize(model, dims, cfg, optimizer, grad_accum=2, device=torch.device("cpu"), bf16=False)
    ids = torch.randint(0, model.args.vocab_size, (2, 16))
    batch = {"input_ids": ids, "position_ids": torch.arange(16).expand(2, 16), "doc_ids": None}

    def head(hidden, weight):
        return (hidden @ weight.t()).float().logsumexp(-1).mean()

    losses = []
    for i in range(2):
        loss = engine.forward(batch, head, last=i == 1)
        engine.backward(loss)
        losses.append(loss.item())
    twice = engine.full_grads()
    ref = {n: torch.autograd.grad(head(model.hidden_states(ids), model.output_weight), p, retain_graph=True)[0] * 2
           for n, p in list(model.named_parameters())[:3]}
    for name, grad in ref.items():
        torch.testing.assert_close(twice[name], grad, rtol=1e-5, atol=1e-7)  # fp32: summation order only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = engine.step(float("nan"))
    assert not result.applied and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    engine.backward(engine.forward(batch, head))
    result = engine.step(losses[0])
    assert result.applied and result.grad_norm > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_resume_plan_reads_only(tmp_path):
    """A ZeRO checkpoint resumed at another stage plans the universal conversion but writes nothing:
    the conversion is the engine's load, after the engine exists."""
    root = tmp_path / "checkpoints"
    ckpt = CheckpointManager(root, keep=2)
    args = {"hidden_size": 64}
    state = {"step": 3, "tokens_seen": 12, "global_batch_size": 4, "seq_len": 256, "seed": 0, "world_size": 2,
             "model_args": args, "zero": {"stage": 2, "shards": 2, "layout": "dp2"}}
    ckpt.save(3, lambda d: (d / "trainer_state.json").write_text(json.dumps(state)), meta={"step": 3})
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    expected = {"model_args": args, "global_batch_size": 4, "seq_len": 256, "seed": 0}
    plan = plan_resume(ckpt, "auto", tmp_path, expected, stage=3, shards=2)
    assert plan.mode == "universal" and (plan.saved_stage, plan.saved_shards) == (2, 2)
    assert plan_resume(ckpt, "auto", tmp_path, expected, stage=2, shards=2).mode == "same"
    assert plan_resume(ckpt, "auto", tmp_path, expected, stage=0, shards=2).mode == "zero_to_plain"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing
    with pytest.raises(ValueError, match="data.seq_len"):
        plan_resume(ckpt, "auto", tmp_path, {**expected, "seq_len": 512}, stage=2, shards=2)


def test_plain_engine_runs_the_lm_head_under_autocast():
    """Under bf16 autocast the plain engine's head (the chunked loss) multiplies in bf16 like every other
    matmul: run outside autocast it took fp32 matmuls over the whole vocabulary and kept an fp32
    gradient of the hidden states (found by bench/cuda_trace.py)."""
    from functools import partial

    from torch.utils._python_dispatch import TorchDispatchMode

    from longtrain.optim.loss import chunked_lm_loss

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.vocab_dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
                if vocab in out.shape:
                    self.vocab_dtypes.add(args[-1].dtype if func is torch.ops.aten.mm.default else args[-2].dtype)
            return out

    torch.manual_seed(0)
    model = Transformer(get_model_args("tiny", num_layers=1))
    model.init_weights()
    vocab = model.args.vocab_size
    engine = PlainEngine(model, build_optimizer(model, Config().optim, torch.device("cpu")), None, 1.0,
                         autocast_dtype=torch.bfloat16)
    # CUDA's autocast runs RMSNorm in fp32 (CPU's does not), so the final norm hands the head fp32
    # states: the pre-hooks do what it does
    for m in model.modules():
        if isinstance(m, torch.nn.RMSNorm):
            m.register_forward_pre_hook(lambda mod, args: (args[0].float(),))
    ids = torch.randint(0, vocab, (1, 65))
    batch = {"input_ids": ids[:, :-1], "position_ids": torch.arange(64)[None], "doc_ids": None}
    head = partial(chunked_lm_loss, labels=ids[:, 1:], weights=None, chunk_size=32)
    with Matmuls() as seen:
        engine.backward(engine.forward(batch, head))
    assert seen.vocab_dtypes == {torch.bfloat16}
