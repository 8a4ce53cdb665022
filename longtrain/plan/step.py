"""One training step of longtrain's own code path, run under :class:`~longtrain.plan.tracker.StepTracker`.

:func:`run_step` builds what the trainer builds (``build_model_args``, ``build_model``,
``build_optimizer``, ``parallelize`` with the real config, so checkpointing, StreamBP and offload
are the training ones) and drives the step engine as :mod:`longtrain.trainer.step` does: per
micro-batch ``engine.forward(batch, chunked_lm_loss head)`` and ``engine.backward(loss)``, then
``engine.step(loss)`` (clip and ``optimizer.step()``). With ``fake=True`` every floating tensor is a
:class:`~torch._subclasses.fake_tensor.FakeTensor` (no memory, no compute); with ``fake=False`` the
same step runs for real, which is how the tests check the plan.

The step measured is a steady-state one: the optimizer state exists before it starts (torch's
AdamW creates it lazily in the first ``optimizer.step()``, which is run once on zero gradients
before tracking begins). Each row is one document (``doc_ids`` all 0).

Precision: the tensors live on the CPU (this torch build cannot fake CUDA tensors: the first
matmul on a fake CUDA tensor aborts in the CUDA device guard), so a GPU target is planned as
training on CUDA would run, in ``trainer.precision`` resolved for CUDA (``auto``: bf16 autocast on
the plain engine), but through CPU autocast and the CPU kernels (SDPA's CPU flash kernel, the
reference block kernels under StreamBP). Offload to host memory under a GPU target is modelled by
:class:`PlannedHostCopy`; without a target (CPU) the real ``HostCopy`` keeps the tensor as is.
"""
from __future__ import annotations

import copy
import functools
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Dict, Optional
from unittest import mock

import torch

from longtrain.config import Config
from longtrain.memory import auto_chunk_size
from longtrain.optim.loss import IGNORE_INDEX, chunked_lm_loss
from longtrain.optim.optimizer import build_optimizer
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.parallelize import parallelize
from longtrain.plan.gpus import Gpu
from longtrain.plan.tracker import StepTracker, storage_key
from longtrain.models import Transformer
from longtrain.trainer.build import build_model_args, resolve_batch_layout, resolve_precision


@dataclass
class StepPlan:
    """What one training step holds and costs on one rank (bytes, FLOPs, seconds)."""

    seq_len: int
    tokens: int
    precision: str
    peak_bytes: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_at_peak: int
    activations_kept: int
    largest_transient: int
    host_bytes: int
    peak_phase: str
    flops: int
    formula_flops: float
    time_s: float = 0.0
    compute_s: float = 0.0
    memory_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    streambp_chunk: Optional[int] = None
    extra: Dict[str, float] = field(default_factory=dict)


class PlannedHostCopy:
    """:class:`~longtrain.memory.offload.HostCopy` as it behaves on a GPU, for a plan whose tensors
    all live on the CPU: the parked tensor becomes a host tensor (counted as host memory, so the
    device copy is free once nothing else holds it) and :meth:`fetch` brings a new device copy."""

    tracker: Optional[StepTracker] = None

    def __init__(self, x_bsh: torch.Tensor) -> None:
        self.tensor = x_bsh.detach().clone()
        if self.tracker is not None:
            self.tracker.mark_host(self.tensor)

    def fetch(self) -> torch.Tensor:
        out, self.tensor = self.tensor.clone(), None
        return out


def _keys(tensors) -> set:
    return {storage_key(t) for t in tensors if t is not None}


def _config_for_target(cfg: Config, args, on_gpu: bool, bf16: bool, memory_bytes: Optional[int]) -> Config:
    """``cfg`` with ``memory.streambp.chunk_size=auto`` resolved as training on the target would:
    from the device memory left after the parameters (CPU: the default)."""
    cfg = copy.deepcopy(cfg)
    sc = cfg.memory.streambp
    if sc.enabled and sc.chunk_size == "auto":
        elem = 2 if bf16 else 4
        free = None
        if on_gpu and memory_bytes:
            free = max(0, memory_bytes - args.num_params() * 4)
        sc.chunk_size = auto_chunk_size(args, cfg.data.seq_len, cfg.data.micro_batch_size, free, elem_bytes=elem)
    return cfg


def run_step(cfg: Config, gpu: Optional[Gpu] = None, fake: bool = True) -> StepPlan:
    """Run one training step of ``cfg`` on one process (dp = sp = 1, ZeRO stage 0) and return its plan.

    Args:
        cfg: the validated config (as training gets it).
        gpu: the target device (bf16 where ``trainer.precision`` resolves so on CUDA; roofline);
            None: plan for the CPU as the step runs here.
        fake: fake tensors (plan) or real ones (measurement).
    """
    if cfg.zero.stage != 0:
        raise ValueError(f"zero.stage={cfg.zero.stage}: the planner covers ZeRO stage 0 so far; set zero.stage=0")
    sp = cfg.parallel.sp
    dims = ParallelDims(world_size=1, ulysses=sp.ulysses, ring=sp.ring)
    if dims.sp != 1:
        raise ValueError("parallel.sp: the planner covers one process (ulysses = ring = 1) so far")
    dims.validate_seq_len(cfg.data.seq_len)
    args = build_model_args(cfg.model)
    dims.validate_model(args.num_heads, args.num_kv_heads)
    if args.moe_layers:
        raise ValueError("model.moe: the planner covers dense models so far")
    _, grad_accum = resolve_batch_layout(cfg.data.global_batch_size, cfg.data.micro_batch_size,
                                         cfg.trainer.grad_accum, dims.dp)
    target = torch.device("cuda") if gpu is not None else torch.device("cpu")
    precision = resolve_precision(cfg.trainer.precision, target)
    bf16 = precision == "bf16"
    cfg = _config_for_target(cfg, args, gpu is not None, bf16, gpu.memory_bytes if gpu else None)
    device = torch.device("cpu")
    seq, mb = cfg.data.seq_len, cfg.data.micro_batch_size
    tracker = StepTracker(gpu.bf16_flops if gpu else 0.0, gpu.hbm_bytes_per_s if gpu else 0.0, fake=fake)
    g = torch.Generator().manual_seed(cfg.trainer.seed)
    batches = []
    for _ in range(grad_accum):
        ids = torch.randint(0, args.vocab_size, (mb, seq + 1), generator=g)
        batches.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                        "position_ids": torch.arange(seq).expand(mb, seq).contiguous(),
                        "doc_ids": torch.zeros(mb, seq, dtype=torch.long)})
    num_valid = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    with ExitStack() as stack:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        if cfg.memory.offload_checkpoints and gpu is not None:
            PlannedHostCopy.tracker = tracker
            stack.enter_context(mock.patch("longtrain.memory.streambp.HostCopy", PlannedHostCopy))
        # build_model without its final .to(device) (the tensors are made on the CPU already; moving
        # fake parameters in place is refused) and without model.hf_path's weights (values do not matter)
        torch.manual_seed(cfg.trainer.seed)
        model = Transformer(args)
        model.init_weights()
        optimizer = build_optimizer(model, cfg.optim, target)
        engine = parallelize(model, dims, cfg, optimizer, grad_accum=grad_accum, device=device, bf16=bf16)
        engine.train(True)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # steady state: the optimizer state exists before the step (module docstring)
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with tracker:
            for t in [*model.parameters(), *model.buffers()]:
                tracker.track(t)
            state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            for t in state:
                tracker.track(t)
            before = tracker.live_bytes(device.type)
            kept = None
            for i, batch in enumerate(batches):
                tracker.phase = "forward"
                labels = batch["labels"]
                weights = (labels != IGNORE_INDEX).float() / max(num_valid, 1)
                head = functools.partial(chunked_lm_loss, labels=labels, weights=weights,
                                         chunk_size=cfg.trainer.loss_chunk_size)
                loss = engine.forward(batch, head, last=i == len(batches) - 1)
                if kept is None:
                    kept = tracker.live_bytes(device.type) - before
                tracker.phase = "backward"
                engine.backward(loss)
                del loss
            grads = [p.grad for p in params]
            grad_keys = tracker.serials(grads)
            grads_bytes = sum(t.untyped_storage().nbytes() for t in grads if t is not None)
            del grads
            tracker.phase = "optimizer"
            engine.step(1.0)
    param_keys = tracker.serials_of_storages(model.parameters())
    state_keys = tracker.serials_of_storages(state)
    at_peak = tracker.peak_snapshot
    cats = {"params": 0, "grads": 0, "optimizer": 0, "other": 0}
    for serial, (size, dev) in at_peak.items():
        if dev == "host":
            continue
        cat = ("params" if serial in param_keys else "grads" if serial in grad_keys
               else "optimizer" if serial in state_keys else "other")
        cats[cat] += size
    states = param_keys | grad_keys | state_keys
    largest = max((size for serial, size in tracker.allocations if serial not in states), default=0)
    tokens = mb * seq * grad_accum
    plan = StepPlan(seq_len=seq, tokens=tokens, precision=precision, peak_bytes=tracker.peak,
                    params_bytes=sum(p.untyped_storage().nbytes() for p in model.parameters()),
                    grads_bytes=grads_bytes,
                    optimizer_bytes=sum(t.untyped_storage().nbytes() for t in state),
                    activations_at_peak=cats["other"], activations_kept=kept or 0, largest_transient=largest,
                    host_bytes=tracker.host_peak, peak_phase=tracker.peak_phase, flops=tracker.flops,
                    formula_flops=args.flops_per_token(seq) * tokens,
                    streambp_chunk=cfg.memory.streambp.chunk_size if cfg.memory.streambp.enabled else None)
    plan.extra = {f"peak_{k}": v for k, v in cats.items()}
    if gpu is not None:
        plan.time_s, plan.compute_s, plan.memory_s = tracker.time_s, tracker.compute_s, tracker.memory_s
        plan.tokens_per_s = tokens / plan.time_s if plan.time_s else 0.0
        plan.mfu = plan.formula_flops / plan.time_s / gpu.bf16_flops if plan.time_s else 0.0
    return plan
