"""The training loop: build everything from the typed config, then step, evaluate, checkpoint.

Order of construction (each piece gets typed sub-configs; only :func:`parallelize` reads several
groups, in its one written order):

config -> :func:`~longtrain.trainer.build.layout_run` (:class:`~longtrain.parallel.dims.ParallelDims`
with every process group, the model geometry, the batch arithmetic, the precision) -> data (checked
against the vocabulary) -> resume plan -> :func:`~longtrain.trainer.build.build_run` (model,
optimizer and schedule, :func:`~longtrain.parallel.parallelize.parallelize`: sequence-parallel
attention, then the layer wrappers, then the step engine; the MoE balancer) -> resume -> metrics.
The start-up check and the planner build through the same two functions.

From then on the loop talks to the step engine only (:mod:`longtrain.parallel.engine`: plain torch
or DeepSpeed ZeRO); the step is in :mod:`longtrain.trainer.step`, evaluation in
:mod:`longtrain.trainer.evaluate`, checkpoints and resume in :mod:`longtrain.trainer.resume`.

Faults (:mod:`longtrain.trainer.faults`): SIGTERM, SIGUSR1 or ``run.dir/STOP`` end ``fit()`` after
the current step with a checkpoint; a collective that fails because a rank died or timed out
becomes a one-line :class:`TrainingFault`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

from longtrain.config import Config
from longtrain.optim.schedule import build_scheduler
from longtrain.parallel.distributed import DistInfo, all_gather_objects, barrier
from longtrain.trainer.build import build_run, layout_run
from longtrain.trainer.checkpoint import CheckpointManager, step_dir_name
from longtrain.trainer.data import GlobalBatchSampler, build_datasets
from longtrain.trainer.evaluate import EvalMixin
from longtrain.trainer.faults import STOP_FILE, StopRequests, TrainingFault, comm_failure_message, is_comm_failure
from longtrain.trainer.metrics import MetricsLogger, peak_flops_per_device
from longtrain.trainer.resume import CheckpointMixin, load_before_engine, plan_resume
from longtrain.trainer.step import StepMixin

log = logging.getLogger("longtrain")


class Trainer(StepMixin, EvalMixin, CheckpointMixin):
    """Owns the model, step engine, data and I/O of one run; ``fit()`` trains to ``trainer.max_steps``."""

    def __init__(self, cfg: Config, dist_info: DistInfo, config_yaml: str = "") -> None:
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.run.dir)
        tc, dc = cfg.trainer, cfg.data

        layout = layout_run(cfg, dist_info.world_size, self.device)  # checks, then every process group
        self.dims, self.model_args = layout.dims, layout.args
        self.dp_rank, self.dp_size = self.dims.rank("dp"), self.dims.size("dp")
        self.global_batch_size, self.grad_accum, self.bf16 = layout.global_batch_size, layout.grad_accum, layout.bf16
        precision = layout.precision
        # Token counts, losses and gradients are summed over every rank that sees distinct tokens.
        self.reduce_group = self.dims.group("dp_sp")
        self.data = build_datasets(dc, vocab_size=self.model_args.vocab_size, seed=tc.seed, rank=dist_info.rank,
                                   barrier=barrier, log=self._info)
        self.sampler = GlobalBatchSampler(self.data.train.num_rows, self.global_batch_size, tc.seed)

        self.step, self.tokens_seen, self.skipped_in_a_row = 0, 0, 0
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep, rank=dist_info.rank,
                                      world_size=dist_info.world_size, barrier=barrier, all_gather=all_gather_objects)
        resume = plan_resume(self.ckpt, cfg.checkpoint.resume, self.run_dir, self._expected(), cfg.zero.stage,
                             self.dims.size("dp_sp"))

        def before_engine(model, optimizer) -> None:
            self.scheduler = build_scheduler(optimizer, cfg.optim, tc.max_steps)
            load_before_engine(resume, model)

        run = build_run(cfg, layout, self.device, before_engine=before_engine,
                        load_universal=resume is not None and resume.mode == "universal")
        self.model, self.optimizer, self.engine, self.balancer = run.model, run.optimizer, run.engine, run.balancer
        if dist_info.is_writer:
            for name, text in self.engine.config_files().items():
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / name).write_text(text)
        self.memory: Optional[dict] = None
        self._memory_pending = True
        self._resume(resume)

        self.peak_flops = peak_flops_per_device(self.device, cfg.logging.peak_tflops)
        self.flops_per_token = self.model_args.flops_per_token(dc.seq_len)
        self.metrics = MetricsLogger(self.run_dir, enabled=dist_info.is_writer, wandb_cfg=cfg.logging.wandb,
                                     run_name=cfg.run.name or self.run_dir.name, config=asdict(cfg),
                                     total_steps=tc.max_steps, start_step=self.step, progress=cfg.logging.progress)
        self._info(f"model {cfg.model.name}: {self.model_args.num_params() / 1e6:.1f}M parameters; "
                   f"layout {self.dims.describe()}; global batch {self.global_batch_size} x {dc.seq_len} tokens "
                   f"= {dc.micro_batch_size} per micro-batch x {self.grad_accum} accumulation x {self.dp_size} data-parallel ranks; "
                   f"precision {precision}; device {self.device}; zero stage {cfg.zero.stage}")

    def _info(self, msg: str) -> None:
        if self.dist.is_writer:
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.info(msg)
            else:
                log.info(msg)

    # ------------------------------------------------------------------ main loop
    def fit(self) -> Optional[Dict[str, float]]:
        """Train until ``trainer.max_steps`` (or ``trainer.stop_at_step``); returns the last metrics.

        Returns normally, after saving a checkpoint, when SIGTERM or SIGUSR1 reaches any rank or
        ``run.dir/STOP`` appears: the ranks agree at the end of every step (one all-reduce), stop
        after the same step and the writing rank removes the STOP file once the checkpoint is
        published. The signal handlers are installed here (main thread) and restored on return.

        Raises:
            TrainingFault: a non-finite step under ``trainer.nonfinite``, a failed checkpoint save,
                or a collective that failed (a rank died or ``parallel.timeout_s`` ran out).
        """
        stops = StopRequests(self.run_dir / STOP_FILE, rank=self.dist.rank, check_file=self.dist.is_writer,
                             device=self.device)
        try:
            with stops:
                return self._fit(stops)
        except RuntimeError as err:
            if self.dist.world_size > 1 and is_comm_failure(err):
                raise TrainingFault(comm_failure_message(err, self.dist.rank, self.step,
                                                         self.cfg.parallel.timeout_s)) from err
            raise

    def _fit(self, stops: StopRequests) -> Optional[Dict[str, float]]:
        tc, cc = self.cfg.trainer, self.cfg.checkpoint
        stop = min(tc.max_steps, tc.stop_at_step) if tc.stop_at_step else tc.max_steps
        last: Optional[Dict[str, float]] = None
        saved_at, reason = -1, None
        if self.step >= stop:
            self._info(f"already at step {self.step} (stop {stop}): nothing to train")
        while self.step < stop:
            metrics = self.train_step()
            reason = stops.poll()  # every rank, every step: all stop after the same one
            evaluate = tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.max_steps)
            if evaluate:
                metrics.update(self.evaluate())
            if evaluate or self.step % self.cfg.logging.log_every == 0 or self.step == stop or reason:
                self.metrics.log(self.step, metrics)
            last = metrics
            if cc.every and self.step % cc.every == 0:
                self.save_checkpoint()
                saved_at = self.step
            if reason is not None:
                path = self.save_checkpoint() if saved_at != self.step else self.ckpt.root / step_dir_name(self.step)
                saved_at = self.step
                self._info(f"stopping after step {self.step} of {tc.max_steps}: {reason}; checkpoint {path}; "
                           "continue with checkpoint.resume=auto")
                if self.dist.is_writer:
                    stops.remove_file()
                break
        if cc.save_final and saved_at != self.step and self.step > 0:
            self.save_checkpoint()
        # The needle grid ends a run that evaluates and finished here (a stopped run has no time to spare).
        if tc.eval_every and last is not None and self.step >= tc.max_steps and reason is None:
            grid = self.needle_grid()
            if grid is not None:
                self.metrics.needle(self.step, grid)
        self.metrics.close()
        return last
