"""The training loop: build everything from the typed config, then step, evaluate, checkpoint.

Order of construction (each piece gets typed sub-configs, never the whole DictConfig):
parallel layout -> model geometry -> data (checked against the vocabulary) -> model -> optimizer
and schedule -> checkpoint manager (resume) -> metrics.

Loss normalisation (DESIGN.md): before the first micro-batch of a step, the count of valid label
tokens of the *whole global batch* is summed over the data-parallel group (one all-reduce). Each
micro-batch then back-propagates ``sum_t CE_t / N_valid_global`` and gradients are summed, never
averaged, across ranks and micro-batches, so every layout computes the same step as one process
that sees the whole global batch at once.

ZeRO (``zero.stage`` 1-3) hands the model and optimizer to a DeepSpeed engine sharding over dp x sp
(:mod:`longtrain.parallel.zero`); the engine reduces the gradients, clips and steps, with the loss
scaled so that the reduction is the same sum. Stage 0 is the plain path below, without DeepSpeed.

Faults (:mod:`longtrain.trainer.faults`): a non-finite loss or gradient norm is caught before the
weights change and stops the run or skips the step (``trainer.nonfinite``); SIGTERM, SIGUSR1 or
``run.dir/STOP`` end ``fit()`` after the current step with a checkpoint; a collective that fails
because a rank died or timed out becomes a one-line :class:`TrainingFault`.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from longtrain.config import Config, ConfigError, ModelConfig
from longtrain.memory import apply_checkpointing, apply_streambp, auto_chunk_size
from longtrain.models import ModelArgs, Transformer, args_from_hf_config, get_model_args, load_hf_weights
from longtrain.optim.loss import IGNORE_INDEX, chunked_lm_loss
from longtrain.optim.optimizer import build_optimizer
from longtrain.optim.schedule import build_scheduler
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.apply import apply_sequence_parallel, sp_comm_stats
from longtrain.parallel import zero as Z
from longtrain.parallel.distributed import (DistInfo, all_gather_objects, all_reduce_gradients, all_reduce_sum,
                                            barrier)
from longtrain.parallel.sharding import shard_batch
from longtrain.trainer.checkpoint import (CheckpointManager, load_model, load_torch, rng_state, save_model,
                                          save_torch, set_rng_state, step_dir_name)
from longtrain.trainer.data import GlobalBatchSampler, build_datasets, collate, collate_domains
from longtrain.trainer.faults import STOP_FILE, StopRequests, TrainingFault, comm_failure_message, is_comm_failure
from longtrain.trainer.metrics import MetricsLogger, peak_flops_per_device
from longtrain.trainer.moe_report import add_domain_counts, summarise, write_expert_load

log = logging.getLogger("longtrain")

_MODEL_OVERRIDES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "rope_theta", "max_position_embeddings", "tie_embeddings", "init_std")


def build_model_args(cfg: ModelConfig) -> ModelArgs:
    """Model geometry: the registry entry ``model.name`` with the geometry keys given in the config
    applied on top, or exactly the geometry of ``model.hf_path``'s config.json."""
    overrides = {k: getattr(cfg, k) for k in _MODEL_OVERRIDES if getattr(cfg, k) is not None}
    moe = cfg.moe.model_args()  # ModelArgs field names equal the model.moe keys
    overrides.update(moe)
    if cfg.hf_path is None:
        return get_model_args(cfg.name, **overrides)
    if overrides:
        key = next(iter(overrides))
        raise ConfigError(f"model.{'moe.' * (key in moe)}{key}: the geometry comes from model.hf_path's config.json "
                          "and cannot be overridden (the weights would not fit); remove the override")
    config_file = Path(cfg.hf_path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.hf_path: no config.json in '{cfg.hf_path}' (expected a local Hugging Face model "
                          "directory)")
    return args_from_hf_config(json.loads(config_file.read_text()))


def resolve_batch_layout(global_batch_size: Optional[int], micro_batch_size: int, grad_accum: Optional[int],
                         dp_size: int) -> Tuple[int, int]:
    """(global batch size, accumulation steps) from the config, checked against each other.

    Raises:
        ConfigError: the three do not multiply out, naming the keys and a consistent value.
    """
    per_pass = micro_batch_size * dp_size
    if global_batch_size is None:
        return per_pass * (grad_accum or 1), grad_accum or 1
    if grad_accum is None:
        if global_batch_size % per_pass:
            raise ConfigError(f"data.global_batch_size={global_batch_size} is not a multiple of data.micro_batch_size "
                              f"({micro_batch_size}) x data-parallel degree ({dp_size}) = {per_pass}; set "
                              f"data.global_batch_size={max(1, global_batch_size // per_pass) * per_pass}")
        return global_batch_size, global_batch_size // per_pass
    if global_batch_size != per_pass * grad_accum:
        fix = f"set data.global_batch_size={per_pass * grad_accum}"
        if global_batch_size % per_pass == 0:
            fix += f" or trainer.grad_accum={global_batch_size // per_pass} (or null)"
        raise ConfigError(f"data.global_batch_size={global_batch_size} must equal data.micro_batch_size "
                          f"({micro_batch_size}) x trainer.grad_accum ({grad_accum}) x data-parallel degree "
                          f"({dp_size}) = {per_pass * grad_accum}; {fix}")
    return global_batch_size, grad_accum


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: peak RSS


class Trainer:
    """Owns the model, optimizer, data and I/O of one run; ``fit()`` trains to ``trainer.max_steps``."""

    def __init__(self, cfg: Config, dist_info: DistInfo, config_yaml: str = "") -> None:
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.run.dir)
        tc, dc = cfg.trainer, cfg.data

        sp = cfg.parallel.sp
        self.dims = ParallelDims(world_size=dist_info.world_size, ulysses=sp.ulysses, ring=sp.ring)
        self.dims.validate_seq_len(dc.seq_len)
        self.dp_rank, self.dp_size = self.dims.rank("dp"), self.dims.size("dp")
        self.global_batch_size, self.grad_accum = resolve_batch_layout(dc.global_batch_size, dc.micro_batch_size,
                                                                       tc.grad_accum, self.dp_size)
        precision = tc.precision if tc.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None

        self.model_args = build_model_args(cfg.model)
        self.dims.validate_model(self.model_args.num_heads, self.model_args.num_kv_heads)
        self.dims.build_groups()
        # Token counts, losses and gradients are summed over every rank that sees distinct tokens.
        self.reduce_group = self.dims.group("dp_sp")
        self.data = build_datasets(dc, vocab_size=self.model_args.vocab_size, seed=tc.seed, rank=dist_info.rank,
                                   barrier=barrier, log=self._info)
        self.sampler = GlobalBatchSampler(self.data.train.num_rows, self.global_batch_size, tc.seed)

        torch.manual_seed(tc.seed)
        self.model = Transformer(self.model_args)
        self.model.init_weights()
        if cfg.model.hf_path is not None:
            load_hf_weights(self.model, cfg.model.hf_path)
        self.model.to(self.device)
        if cfg.memory.checkpointing:
            apply_checkpointing(self.model)
        apply_sequence_parallel(self.model, self.dims, dc.seq_len, sp.ulysses_chunks)
        self._apply_streambp(precision)
        self.model.train()
        self.step, self.tokens_seen, self.skipped_in_a_row = 0, 0, 0
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep, rank=dist_info.rank,
                                      world_size=dist_info.world_size, barrier=barrier, all_gather=all_gather_objects)
        resume = self._resume_plan(cfg.checkpoint.resume)
        zc = cfg.zero
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device, offload=zc.offload_optimizer == "cpu")
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.max_steps)
        self.engine, self.zero_loss_factor, self.memory = None, 1.0, None
        self.bf16 = precision == "bf16"
        if zc.stage > 0:
            if resume is not None and resume[1] == "plain_to_zero":  # before the engine copies the weights
                load_model(self.model, resume[0] / "model.safetensors")
            self.ds_config = Z.deepspeed_config(zc, dc.micro_batch_size, self.grad_accum, self.dp_size,
                                                bf16=precision == "bf16", clip_grad_norm=cfg.optim.clip_grad_norm,
                                                load_universal=resume is not None and resume[1] == "universal")
            if dist_info.is_writer:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")
            self.autocast_dtype = None  # DeepSpeed's bf16 mode holds bf16 parameters: no autocast
            self.engine, self.zero_loss_factor = Z.apply_zero(self.model, self.optimizer, self.dims, self.ds_config)
        self.balancer = None
        if self.model_args.moe_layers:
            from longtrain.optim.balance import Balancer
            self.balancer = Balancer(self.model, cfg.moe, self.dims, dc.micro_batch_size, self.grad_accum,
                                     dc.seq_len, grad_scale=self.zero_loss_factor)
        self._resume(resume)

        self.peak_flops = peak_flops_per_device(self.device, cfg.logging.peak_tflops)
        self.flops_per_token = self.model_args.flops_per_token(dc.seq_len)
        self.metrics = MetricsLogger(self.run_dir, enabled=dist_info.is_writer, wandb_cfg=cfg.logging.wandb,
                                     run_name=cfg.run.name or self.run_dir.name, config=asdict(cfg),
                                     total_steps=tc.max_steps, start_step=self.step, progress=cfg.logging.progress)
        self._info(f"model {cfg.model.name}: {self.model_args.num_params() / 1e6:.1f}M parameters; "
                   f"layout {self.dims.describe()}; global batch {self.global_batch_size} x {dc.seq_len} tokens "
                   f"= {dc.micro_batch_size} per micro-batch x {self.grad_accum} accumulation x {self.dp_size} data-parallel ranks; "
                   f"precision {precision}; device {self.device}; zero stage {zc.stage}")

    # ------------------------------------------------------------------ helpers
    def _apply_streambp(self, precision: str) -> None:
        """Stream every layer's backward (``memory.streambp``), after sequence parallelism is applied
        (the streamed backward follows each layer's attention function)."""
        mc = self.cfg.memory
        if not mc.streambp.enabled:
            return
        chunk = mc.streambp.chunk_size
        if chunk == "auto":
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
            chunk = auto_chunk_size(self.model_args, self.cfg.data.seq_len // self.dims.sp,
                                    self.cfg.data.micro_batch_size, free, elem_bytes=2 if precision == "bf16" else 4)
        apply_streambp(self.model, chunk, mc.offload_checkpoints)

    def _info(self, msg: str) -> None:
        if self.dist.is_writer:
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.info(msg)
            else:
                log.info(msg)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _hidden(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return self.model.hidden_states(batch["input_ids"], position_ids=batch["position_ids"],
                                            doc_ids=batch["doc_ids"])

    def _head(self, batch: Dict[str, torch.Tensor], head):
        """``head(final hidden states, LM head weight)`` for ``batch``; through the engine under ZeRO,
        whose forward gathers the ZeRO-3 shards the head needs."""
        if self.engine is None:
            return head(self._hidden(batch), self.model.output_weight)
        return self.engine(batch["input_ids"], batch["position_ids"], batch["doc_ids"], head)

    def _module(self) -> torch.nn.Module:
        return self.model if self.engine is None else self.engine

    # ------------------------------------------------------------------ training
    def _local_batch(self, packed, rows) -> Dict[str, torch.Tensor]:
        """Rows ``rows`` of ``packed``, cut to this rank's part of each sequence, on the device."""
        return self._to_device(shard_batch(collate(packed, rows), self.dims))

    def forward_backward(self) -> Tuple[float, int]:
        """Accumulate this rank's gradients for step ``self.step``; returns (global loss, valid tokens).

        The loss each micro-batch back-propagates is its token-loss sum over the global count of
        valid tokens (counted first, in one all-reduce over dp x sp), so summing gradients over
        ranks and micro-batches gives exactly the gradient of the global mean.
        """
        cfg = self.cfg
        rows = self.sampler.local_micro_batches(self.step, self.dp_rank, self.dp_size, cfg.data.micro_batch_size,
                                                self.grad_accum)
        batches = [self._local_batch(self.data.train, r) for r in rows]
        valid = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)], dtype=torch.float64,
                             device=self.device)
        num_valid = int(all_reduce_sum(valid, self.reduce_group).item())  # the one count all-reduce of the step
        if self.balancer is not None:
            self.balancer.begin_step()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            labels = batch["labels"]
            weights = (labels != IGNORE_INDEX).float() / max(num_valid, 1)
            if self.engine is None:
                loss = chunked_lm_loss(self._hidden(batch), self.model.output_weight, labels, weights,
                                       cfg.trainer.loss_chunk_size)
                if self.balancer is not None:
                    self.balancer.after_forward()
                loss.backward()
            else:
                # The engine reduces at the boundary (ZeRO-1) or as gradients arrive (2, 3); its
                # averaging divisor (dp, or dp x sp for ZeRO-3) is cancelled by zero_loss_factor, and
                # scale_wrt_gas=False keeps it from dividing by the accumulation steps: the gradient
                # is the plain sum (longtrain/parallel/zero.py).
                self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
                loss = self._head(batch, functools.partial(chunked_lm_loss, labels=labels, weights=weights,
                                                           chunk_size=cfg.trainer.loss_chunk_size))
                if self.balancer is not None:
                    self.balancer.after_forward()
                self.engine.backward(loss * self.zero_loss_factor, scale_wrt_gas=False)
            loss_sum += loss.detach().double()
        if self.engine is None:
            all_reduce_gradients(self.model.parameters(), self.reduce_group)
        return float(all_reduce_sum(loss_sum, self.reduce_group).item()), num_valid

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over this rank's share of the global batch of step ``self.step``."""
        cfg = self.cfg
        t0 = time.perf_counter()
        bytes0, comm0 = sp_comm_stats()
        report = self.engine is not None and self.memory is None  # once, on the first step under ZeRO
        cuda = self.device.type == "cuda"
        grads0 = torch.cuda.memory_allocated(self.device) if report and cuda else 0
        loss, num_valid = self.forward_backward()
        # Activations are freed by now: what the backward left allocated is gradient storage.
        grads = torch.cuda.memory_allocated(self.device) - grads0 if report and cuda else None
        every = cfg.logging.expert_frac_every
        moe_metrics = {} if self.balancer is None else self.balancer.end_step(
            expert_frac=every > 0 and (self.step == 0 or (self.step + 1) % every == 0))
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is None:
            # Loss and gradients are already summed over every rank, so every rank takes the same
            # decision. A non-finite norm makes the clip write NaNs into the gradients: dropped below.
            clip = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
            skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
            if skipped:
                self._nonfinite(loss, grad_norm, updated=False)  # raises under trainer.nonfinite=stop
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            # DeepSpeed computes the global gradient norm inside step() and, when it is not finite,
            # skips the update (weights, Adam state) and drops the gradients; see _nonfinite.
            self.engine.step()  # clips to optim.clip_grad_norm (same formula as torch's), steps, zeroes grads
            grad_norm = float(self.engine.get_global_grad_norm())
            skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
            if skipped:
                self._nonfinite(loss, grad_norm, updated=self.engine.was_step_applied())
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.balancer is not None and not skipped:
            self.balancer.update_bias()  # the routing bias moves with the weights, never on a skipped step
        self.scheduler.step()
        if report:  # after the first step every buffer exists (torch's AdamW creates its state lazily)
            self.memory = self._memory_report(grads)
            self._info(self._memory_line())
        if self.device.type == "cuda":
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
               "peak_mem_gib": _peak_mem_gib(self.device),
               "tokens_per_rank": step_tokens // self.dist.world_size, **moe_metrics}
        if self.dims.sp > 1:
            bytes1, comm1 = sp_comm_stats()
            out["sp_bytes_sent"] = bytes1 - bytes0  # this rank, forward and backward, all layers
            out["sp_comm_frac"] = (comm1 - comm0) / dt  # share of the step spent in exposed SP communication
        return out

    def _nonfinite(self, loss: float, grad_norm: float, updated: bool) -> None:
        """Apply ``trainer.nonfinite`` to step ``self.step + 1``, whose loss or gradient norm is not
        finite and whose update was not applied (``updated`` False); the caller drops the gradients.

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

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Eval loss over ``trainer.eval_rows`` eval sequences and passkey accuracy by depth.

        Rows are split over the data-parallel ranks and each row over the sequence-parallel ranks,
        as in training; sums are reduced over dp x sp.
        """
        self._module().eval()
        out: Dict[str, float] = {}
        mbs, limit = self.cfg.data.micro_batch_size, self.cfg.trainer.eval_rows
        if self.data.eval is not None:
            rows = np.arange(self.data.eval.num_rows if limit == 0 else min(limit, self.data.eval.num_rows))
            mine = rows[self.dp_rank::self.dp_size]
            sums = torch.zeros(2, dtype=torch.float64, device=self.device)
            by_domain = self._domain_counts()
            for i in range(0, len(mine), mbs):
                batch = self._local_batch(self.data.eval, mine[i:i + mbs])
                labels = batch["labels"]
                sums[0] += self._head(batch, functools.partial(chunked_lm_loss, labels=labels, weights=None,
                                                               chunk_size=self.cfg.trainer.loss_chunk_size)).double()
                sums[1] += (labels != IGNORE_INDEX).sum()
                if by_domain is not None:
                    domains = shard_batch({"domains": collate_domains(self.data.eval, mine[i:i + mbs])}, self.dims)
                    add_domain_counts(by_domain, self.balancer.blocks, domains["domains"])
            all_reduce_sum(sums, self.reduce_group)
            out["eval_loss"] = float(sums[0] / sums[1].clamp(min=1))
            if by_domain is not None:
                out.update(self._report_domains(all_reduce_sum(by_domain, self.reduce_group)))
        pk = self.data.passkey_eval
        if pk is not None:
            mine = np.arange(pk.num_rows)[self.dp_rank::self.dp_size]
            results = []
            for i in range(0, len(mine), mbs):
                full, answer_mask, depth = pk.batch(mine[i:i + mbs])
                batch = self._to_device(shard_batch({**full, "answer_mask": answer_mask}, self.dims))
                answer_mask = batch.pop("answer_mask").bool()
                logits = self._head(batch, lambda hidden, weight: hidden[answer_mask].float() @ weight.float().t())
                hit = torch.zeros_like(answer_mask)
                hit[answer_mask] = logits.argmax(-1) == batch["labels"][answer_mask]
                # Each sequence-parallel rank holds part of every row: sum hits and answers over sp.
                counts = all_reduce_sum(torch.stack([hit.sum(1), answer_mask.sum(1)]).double(),
                                        self.dims.group("sp"))
                whole = (counts[0] == counts[1]).tolist()
                digits = (counts[0] / counts[1].clamp(min=1)).tolist()
                results += list(zip(whole, digits, depth.tolist()))
            if self.dims.rank("sp") != 0:
                results = []  # one copy per row: the sp-rank-0 of each data-parallel group reports it
            gathered = [r for part in all_gather_objects(results, self.reduce_group) for r in part]
            out.update(pk.accuracy_by_depth([c for c, _, _ in gathered], [d for _, _, d in gathered]))
            # Per-token accuracy on the key: moves before whole-key accuracy does.
            out["passkey_digit_acc"] = float(np.mean([f for _, f, _ in gathered])) if gathered else 0.0
        self._module().train()
        return out

    def _domain_counts(self) -> Optional[torch.Tensor]:
        """Zero [domains, MoE layers, experts] counts when the eval data has domains and the model
        MoE layers (the expert load by domain is then reported), else None."""
        names = self.data.eval.domain_names
        if self.balancer is None or self.data.eval.domains is None or not names:
            return None
        return torch.zeros(len(names), len(self.balancer.blocks), self.model_args.num_experts,
                           dtype=torch.float64, device=self.device)

    def _report_domains(self, counts: torch.Tensor) -> Dict[str, float]:
        """Specialisation metrics of the eval expert load by domain; the writing rank also draws the
        heat map (run.dir/plots/expert_load_step{N}.png, counts beside it as JSON)."""
        names, top_k = self.data.eval.domain_names, self.model_args.top_k
        counts_np = counts.cpu().numpy()
        if self.dist.is_writer:
            png = write_expert_load(counts_np, names, self.balancer.layer_ids, top_k, self.step,
                                    self.run_dir / "plots")
            self.metrics.image(self.step, "eval/expert_load", png)
        return {f"eval_{k}": v for k, v in summarise(counts_np, names, top_k).items()}

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "global_batch_size": self.global_batch_size,
                "seq_len": self.cfg.data.seq_len, "seed": self.cfg.trainer.seed, "world_size": self.dist.world_size,
                "skipped_in_a_row": self.skipped_in_a_row,
                "model_args": asdict(self.model_args),
                "zero": {"stage": self.cfg.zero.stage, "shards": self.dims.size("dp_sp"),
                         "layout": self.dims.describe()}}

    def save_checkpoint(self) -> Path:
        """Save everything an exact resume needs; every rank saves its own RNG state (and, under
        ZeRO, its DeepSpeed shards under ``zero/``)."""
        def write(tmp: Path) -> None:
            if self.engine is not None:
                Z.save_sharded(self.engine, tmp)
            if self.dist.is_writer:
                if self.engine is None:
                    save_model(self.model, tmp / "model.safetensors")
                    save_torch(self.optimizer.state_dict(), tmp / "optimizer.pt")
                save_torch(self.scheduler.state_dict(), tmp / "scheduler.pt")
                if self.balancer is not None and self.balancer.state_dict():
                    save_torch(self.balancer.state_dict(), tmp / "moe_balance.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(self._state(), indent=1))
            (tmp / "rng").mkdir(parents=True, exist_ok=True)
            save_torch(rng_state(), tmp / "rng" / f"rank_{self.dist.rank:05d}.pt")

        path = self.ckpt.save(self.step, write, meta={"step": self.step, "zero_stage": self.cfg.zero.stage})
        self._info(f"saved checkpoint {path}")
        return path

    def _resume_plan(self, spec: str) -> Optional[Tuple[Path, str]]:
        """The checkpoint to resume from and how: ``(path, mode)`` or None for a fresh start.

        Modes: ``same`` (same ZeRO stage and shard count, or both plain: exact state), ``universal``
        (ZeRO checkpoint, other stage or shard count: converted to DeepSpeed's universal format here,
        which keeps fp32 weights and Adam moments), ``plain_to_zero`` / ``zero_to_plain`` (fp32
        weights, schedule and step carried over; Adam moments restart).

        Raises:
            ConfigError: the checkpoint holds another model, batch size, sequence length or seed.
        """
        if spec == "none":
            existing = self.ckpt.latest_in()
            if existing is not None:
                raise ConfigError(f"checkpoint.resume: run.dir '{self.run_dir}' already holds checkpoint {existing}; "
                                  "pass checkpoint.resume=auto to continue it or choose another run.dir")
            return None
        path = self.ckpt.resolve_resume(spec, check_hashes=True)  # a corrupted newest one falls back
        if path is None:
            return None
        state = json.loads((path / "trainer_state.json").read_text())
        mine = json.loads(json.dumps(asdict(self.model_args)))  # as stored: tuples become lists
        if state["model_args"] != mine:
            diff = sorted(k for k in state["model_args"] if state["model_args"][k] != mine.get(k))
            raise ConfigError(f"checkpoint.resume: {path} holds a different model (differs in {', '.join(diff)}); "
                              "resume with the same model.* settings or start a new run.dir")
        for key, mine in (("global_batch_size", self.global_batch_size), ("seq_len", self.cfg.data.seq_len),
                          ("seed", self.cfg.trainer.seed)):
            if state[key] != mine:
                name = {"global_batch_size": "data.global_batch_size", "seq_len": "data.seq_len",
                        "seed": "trainer.seed"}[key]
                raise ConfigError(f"{name}: the checkpoint {path} was trained with {name}={state[key]} but this run "
                                  f"uses {mine}; the data order would change. Set {name}={state[key]}")
        saved = state.get("zero", {"stage": 0, "shards": state["world_size"]})
        stage = self.cfg.zero.stage
        if (saved["stage"] > 0) != (stage > 0):
            mode = "plain_to_zero" if stage > 0 else "zero_to_plain"
        elif stage > 0 and (saved["stage"], saved["shards"]) != (stage, self.dims.size("dp_sp")):
            mode = "universal"
            self._universal_dir = self.run_dir / "checkpoints" / f".universal-{path.name}"
            if self.dist.is_writer:
                Z.to_universal(path, self._universal_dir)
            barrier()
        else:
            mode = "same"
        if mode != "same":
            self._info(f"resuming {path} (zero stage {saved['stage']} on {saved['shards']} ranks) as zero stage "
                       f"{stage} on {self.dims.size('dp_sp')} ranks: {Z.RESUME_MODES[mode]}")
        return path, mode

    def _resume(self, plan: Optional[Tuple[Path, str]]) -> None:
        if plan is None:
            return
        path, mode = plan
        if self.engine is None and mode == "same":
            load_model(self.model, path / "model.safetensors")
            self.optimizer.load_state_dict(load_torch(path / "optimizer.pt"))
        elif self.engine is None:  # zero_to_plain
            self.model.load_state_dict(Z.consolidated_fp32(path), strict=False)
        elif mode == "same":
            Z.load_sharded(self.engine, path)
        elif mode == "universal":
            Z.load_sharded(self.engine, self._universal_dir)
            barrier()
            if self.dist.is_writer:
                shutil.rmtree(self._universal_dir, ignore_errors=True)
        # plain_to_zero: the weights were loaded before the engine was built
        self.scheduler.load_state_dict(load_torch(path / "scheduler.pt"))
        if self.balancer is not None and (path / "moe_balance.pt").exists():
            self.balancer.load_state_dict(load_torch(path / "moe_balance.pt"))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
        rng_file = path / "rng" / f"rank_{self.dist.rank:05d}.pt"
        if rng_file.exists():
            set_rng_state(load_torch(rng_file))
        else:  # resumed on more ranks than saved: derive a fresh, deterministic stream for this rank
            torch.manual_seed(self.cfg.trainer.seed * 100003 + self.step * 1009 + self.dist.rank)
        self._info(f"resumed from {path} at step {self.step}")

    def export_hf(self, path, dtype: Optional[torch.dtype] = None) -> None:
        """Write the current weights as a Hugging Face directory (:func:`longtrain.models.to_hf`).

        Collective under ZeRO (every rank calls it; ZeRO-3 shards and the fp32 master weights are
        gathered); the writing rank writes.
        """
        from longtrain.models import to_hf

        bias = None if self.balancer is None else self.balancer.bias
        if bias is not None and bias.abs().max() > 0 and self.dist.is_writer:
            log.warning("export_hf: the MoE routing bias (moe.balance.bias_update_rate) has no place in the Hugging "
                        "Face %s format; the exported model routes without it (the bias stays in the checkpoints)",
                        self.model_args.arch)
        if self.engine is None:
            if self.dist.is_writer:
                to_hf(self.model, path, dtype=dtype)
        else:
            state = Z.full_fp32_state_dict(self.model)
            if self.dist.is_writer:
                model = Transformer(self.model_args)
                model.load_state_dict(state, strict=False)
                to_hf(model, path, dtype=dtype)
        barrier()

    # ------------------------------------------------------------------ memory
    def _memory_report(self, grads_device: Optional[int]) -> dict:
        """Expected (ZeRO paper) and measured model-state bytes of every rank after the first step;
        written to ``run.dir/memory_report.json``. ``grads_device``: what the first backward left
        allocated on CUDA (None elsewhere)."""
        zc = self.cfg.zero
        num_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())  # ZeRO-3: full size
        expected = Z.expected_memory(num_params, zc.stage, self.dims.size("dp_sp"), self.bf16,
                                     zc.offload_optimizer == "cpu", zc.offload_params == "cpu")
        measured = Z.measured_memory(self.model, self.engine.optimizer if self.engine else self.optimizer,
                                     self.device)
        report = {"stage": zc.stage, "shards": self.dims.size("dp_sp"), "num_params": num_params,
                  "expected": asdict(expected), "measured": {**asdict(measured), "grads_device": grads_device,
                                                             "grads_host": None}}
        ranks = all_gather_objects({"rank": self.dist.rank, **report}, self.reduce_group)
        if self.dist.is_writer:
            (self.run_dir / "memory_report.json").write_text(json.dumps(ranks, indent=1) + "\n")
        return report

    def _memory_line(self) -> str:
        gib = 2.0**20 if self.memory["expected"]["params_device"] < 2**30 else 2.0**30
        unit = "MiB" if gib == 2.0**20 else "GiB"
        e, m = self.memory["expected"], self.memory["measured"]

        def fmt(x):
            return "n/a" if x is None else f"{x / gib:.3f}"

        def pair(key):
            text = f"{key} {fmt(m[f'{key}_device'])} (expected {fmt(e[f'{key}_device'])}) {unit}"
            if m[f"{key}_host"] or e[f"{key}_host"]:
                text += f" + host {fmt(m[f'{key}_host'])} (expected {fmt(e[f'{key}_host'])})"
            return text

        return (f"memory per rank, zero stage {self.memory['stage']} over {self.memory['shards']} ranks "
                f"(measured vs ZeRO formula): " + "; ".join(pair(k) for k in ("params", "grads", "optimizer")))

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
        saved_at = -1
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
        self.metrics.close()
        return last
