"""One training step of :class:`~longtrain.trainer.loop.Trainer`, through the step engine only.

Loss normalisation (DESIGN.md): before the first micro-batch of a step, the count of valid label
tokens of the *whole global batch* is summed over dp x sp (one all-reduce). Each micro-batch then
back-propagates ``sum_t CE_t / N_valid_global`` and the engine sums gradients, never averages them,
across ranks and micro-batches, so every layout computes the same step as one process that sees
the whole global batch at once.

Faults (:mod:`longtrain.trainer.faults`): a non-finite loss or gradient norm is caught before the
weights change (the engine does not apply such a step) and stops the run or skips the step
(``trainer.nonfinite``).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import resource
import time
from typing import Dict, List, Optional, Protocol, Tuple

import torch

from longtrain.optim.loss import IGNORE_INDEX, chunked_lm_loss
from longtrain.parallel.distributed import all_gather_objects, all_reduce_sum
from longtrain.parallel.engine import describe_memory
from longtrain.parallel.parallelize import sp_comm_stats
from longtrain.parallel.sharding import shard_batch
from longtrain.trainer.data import collate
from longtrain.trainer.faults import TrainingFault

log = logging.getLogger("longtrain")


def peak_mem_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA's allocator peak, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: peak RSS


class MicroBatchObserver(Protocol):
    """What a tool watching the micro-batch loop is told (the planner: which phase its tracker is in)."""

    def before_forward(self, index: int) -> None: ...

    def after_forward(self, index: int) -> None: ...


def micro_batches(engine, balancer, batches: List[Dict[str, torch.Tensor]], num_valid: int, loss_chunk_size: int,
                  observer: Optional[MicroBatchObserver] = None) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of one step through the step engine.

    Each micro-batch back-propagates its token-loss sum over ``num_valid``, the global count of valid
    tokens of the step (module docstring), so the engine ends up holding the gradient of the global
    mean; the MoE ``balancer`` (or None) sees every forward. The trainer and the planner both run it.

    Returns:
        This rank's loss sum over its micro-batches (fp64 scalar, not reduced).
    """
    if balancer is not None:
        balancer.begin_step()
    loss_sum = None
    for i, batch in enumerate(batches):
        if observer is not None:
            observer.before_forward(i)
        labels = batch["labels"]
        weights = (labels != IGNORE_INDEX).float() / max(num_valid, 1)
        head = functools.partial(chunked_lm_loss, labels=labels, weights=weights, chunk_size=loss_chunk_size)
        loss = engine.forward(batch, head, last=i == len(batches) - 1)
        if observer is not None:
            observer.after_forward(i)
        if balancer is not None:
            balancer.after_forward()
        engine.backward(loss)
        loss = loss.detach().double()
        loss_sum = loss if loss_sum is None else loss_sum + loss
    return loss_sum


class StepMixin:
    """The step of :class:`~longtrain.trainer.loop.Trainer` (which owns the attributes used here)."""

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _local_batch(self, packed, rows) -> Dict[str, torch.Tensor]:
        """Rows ``rows`` of ``packed``, cut to this rank's part of each sequence, on the device."""
        return self._to_device(shard_batch(collate(packed, rows), self.dims))

    def forward_backward(self) -> Tuple[float, int]:
        """Accumulate this rank's gradients for step ``self.step``; returns (global loss, valid tokens).

        The loss each micro-batch back-propagates is its token-loss sum over the global count of
        valid tokens (counted first, in one all-reduce over dp x sp); after the last micro-batch
        the engine holds the gradient of the global mean, summed over every rank.
        """
        cfg = self.cfg
        rows = self.sampler.local_micro_batches(self.step, self.dp_rank, self.dp_size, cfg.data.micro_batch_size,
                                                self.grad_accum)
        batches = [self._local_batch(self.data.train, r) for r in rows]
        valid = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)], dtype=torch.float64,
                             device=self.device)
        num_valid = int(all_reduce_sum(valid, self.reduce_group).item())  # the one count all-reduce of the step
        loss_sum = micro_batches(self.engine, self.balancer, batches, num_valid, cfg.trainer.loss_chunk_size)
        return float(all_reduce_sum(loss_sum, self.reduce_group).item()), num_valid

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over this rank's share of the global batch of step ``self.step``."""
        cfg = self.cfg
        t0 = time.perf_counter()
        bytes0, comm0 = sp_comm_stats()
        report = self._memory_pending  # model-state memory, once, on the first step
        cuda = self.device.type == "cuda"
        grads0 = torch.cuda.memory_allocated(self.device) if report and cuda else 0
        loss, num_valid = self.forward_backward()
        # Activations are freed by now: what the backward left allocated is gradient storage.
        grads = torch.cuda.memory_allocated(self.device) - grads0 if report and cuda else None
        every = cfg.logging.expert_frac_every
        moe_metrics = {} if self.balancer is None else self.balancer.end_step(
            expert_frac=every > 0 and (self.step == 0 or (self.step + 1) % every == 0))
        lr = self.scheduler.get_last_lr()[0]
        result = self.engine.step(loss)
        grad_norm = result.grad_norm
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self._nonfinite(loss, grad_norm, updated=result.applied)  # raises under trainer.nonfinite=stop
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.balancer is not None and not skipped:
            self.balancer.update_bias()  # the routing bias moves with the weights, never on a skipped step
        self.scheduler.step()
        if report:  # after the first step every buffer exists (torch's AdamW creates its state lazily)
            self._report_memory(grads)
        if cuda:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        step_tokens = self.global_batch_size * cfg.data.seq_len
        self.step += 1
        self.tokens_seen += step_tokens
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * step_tokens / dt / (self.peak_flops * self.dist.world_size)
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": int(skipped), "tokens": self.tokens_seen,
               "valid_tokens": num_valid,
               "tokens_per_s": step_tokens / dt, "step_time_s": dt, "mfu": mfu,
               "peak_mem_gib": peak_mem_gib(self.device),
               "tokens_per_rank": step_tokens // self.dist.world_size, **moe_metrics}
        if self.dims.sp > 1:
            bytes1, comm1 = sp_comm_stats()
            out["sp_bytes_sent"] = bytes1 - bytes0  # this rank, forward and backward, all layers
            out["sp_comm_frac"] = (comm1 - comm0) / dt  # share of the step spent in exposed SP communication
        return out

    def _report_memory(self, grads_device) -> None:
        """The engine's expected vs measured model-state bytes of every rank, in
        ``run.dir/memory_report.json`` and one log line (engines without a formula report nothing)."""
        self._memory_pending = False
        report = self.engine.memory_report(grads_device)
        if report is None:
            return
        self.memory = report
        ranks = all_gather_objects({"rank": self.dist.rank, **report}, self.reduce_group)
        if self.dist.is_writer:
            (self.run_dir / "memory_report.json").write_text(json.dumps(ranks, indent=1) + "\n")
        self._info(describe_memory(report))

    def _nonfinite(self, loss: float, grad_norm: float, updated: bool) -> None:
        """Apply ``trainer.nonfinite`` to step ``self.step + 1``, whose loss or gradient norm is not
        finite; the engine has dropped the gradients and, unless ``updated``, not changed the weights.

        Raises:
            TrainingFault: under ``stop``; under ``skip`` once ``trainer.max_skipped_steps`` steps in
                a row were skipped; and whenever the update was applied anyway (ZeRO: DeepSpeed only
                skips on a non-finite gradient norm, so a non-finite loss with finite gradients,
                which the cross-entropy does not produce, would get there).
        """
        tc, step = self.cfg.trainer, self.step + 1
        what = f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}"
        if updated:
            raise TrainingFault(f"{what}, and DeepSpeed applied the update: the weights changed "
                                f"(trainer.nonfinite={tc.nonfinite}); resume from the last checkpoint")
        if tc.nonfinite == "stop":
            raise TrainingFault(f"{what}; the weights were not updated (trainer.nonfinite=stop): lower optim.lr or "
                                "check the data and resume from the last checkpoint, or set trainer.nonfinite=skip")
        if self.skipped_in_a_row + 1 >= tc.max_skipped_steps:
            raise TrainingFault(f"{what}: {self.skipped_in_a_row + 1} steps in a row skipped "
                                f"(trainer.max_skipped_steps={tc.max_skipped_steps}); the weights were not updated, "
                                "lower optim.lr or check the data and resume from the last checkpoint")
        if self.dist.is_writer:
            log.warning("%s: step skipped (trainer.nonfinite=skip): gradients dropped, weights unchanged; %d of "
                        "trainer.max_skipped_steps=%d in a row", what, self.skipped_in_a_row + 1, tc.max_skipped_steps)
