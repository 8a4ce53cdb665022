"""Evaluation of :class:`~longtrain.trainer.loop.Trainer`: eval loss, passkey accuracy by depth, the
needle-in-a-haystack grid at the end of a run and, for MoE models on data with domains, the expert
load by domain. Rows are split over the
data-parallel ranks and each row over the sequence-parallel ranks, as in training; sums are
reduced over dp x sp."""
from __future__ import annotations

import functools
from typing import Dict, Optional

import numpy as np
import torch

from longtrain.optim.loss import IGNORE_INDEX, chunked_lm_loss
from longtrain.parallel.distributed import all_gather_objects, all_reduce_sum
from longtrain.parallel.sharding import shard_batch
from longtrain.trainer.data import collate_domains
from longtrain.trainer.moe_report import add_domain_counts, summarise, write_expert_load
from longtrain.trainer.needle import answer_hits, needle_grid, score_passkey


class EvalMixin:
    """``evaluate()`` of :class:`~longtrain.trainer.loop.Trainer` (which owns the attributes used here)."""

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Eval loss over ``trainer.eval_rows`` eval sequences and passkey accuracy by depth."""
        self.engine.train(False)
        out: Dict[str, float] = {}
        if self.data.eval is not None:
            out.update(self._eval_loss())
        if self.data.passkey_eval is not None:
            out.update(self._eval_passkey())
        self.engine.train(True)
        return out

    def _eval_loss(self) -> Dict[str, float]:
        mbs, limit = self.cfg.data.micro_batch_size, self.cfg.trainer.eval_rows
        rows = np.arange(self.data.eval.num_rows if limit == 0 else min(limit, self.data.eval.num_rows))
        mine = rows[self.dp_rank::self.dp_size]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        by_domain = self._domain_counts()
        for i in range(0, len(mine), mbs):
            batch = self._local_batch(self.data.eval, mine[i:i + mbs])
            labels = batch["labels"]
            sums[0] += self.engine.forward(batch, functools.partial(chunked_lm_loss, labels=labels, weights=None,
                                                                    chunk_size=self.cfg.trainer.loss_chunk_size)).double()
            sums[1] += (labels != IGNORE_INDEX).sum()
            if by_domain is not None:
                domains = shard_batch({"domains": collate_domains(self.data.eval, mine[i:i + mbs])}, self.dims)
                add_domain_counts(by_domain, self.balancer.blocks, domains["domains"])
        all_reduce_sum(sums, self.reduce_group)
        out = {"eval_loss": float(sums[0] / sums[1].clamp(min=1))}
        if by_domain is not None:
            out.update(self._report_domains(all_reduce_sum(by_domain, self.reduce_group)))
        return out

    def _eval_passkey(self) -> Dict[str, float]:
        pk = self.data.passkey_eval
        gathered = self._score_passkey(pk)
        out = pk.accuracy_by_depth([c for c, _, _ in gathered], [d for _, _, d in gathered])
        # Per-token accuracy on the key: moves before whole-key accuracy does.
        out["passkey_digit_acc"] = float(np.mean([f for _, f, _ in gathered])) if gathered else 0.0
        return out

    def _score_passkey(self, pk) -> list:
        """Every row of ``pk`` scored (:func:`score_passkey`), rows split over dp and each over sp, gathered
        on every rank. Collective."""
        results = score_passkey(pk, np.arange(pk.num_rows)[self.dp_rank::self.dp_size], self.cfg.data.micro_batch_size,
                                self._passkey_hits, lambda counts: all_reduce_sum(counts, self.dims.group("sp")))
        if self.dims.rank("sp") != 0:
            results = []  # one copy per row: the sp-rank-0 of each data-parallel group reports it
        return [r for part in all_gather_objects(results, self.reduce_group) for r in part]

    def _passkey_hits(self, full: Dict[str, torch.Tensor], answer_mask: torch.Tensor):
        """(argmax right [B, S_local], answer_mask [B, S_local]) of this rank's part of the rows ``full``."""
        batch = self._to_device(shard_batch({**full, "answer_mask": answer_mask}, self.dims))
        answer_mask = batch.pop("answer_mask").bool()
        return answer_hits(lambda head: self.engine.forward(batch, head), batch["labels"], answer_mask), answer_mask

    @torch.no_grad()
    def needle_grid(self) -> Optional[Dict]:
        """Passkey accuracy by depth and length (``data.passkey.grid_lengths`` x ``data.seq_len``), or
        None when the run has no passkey evaluation or no grid lengths. Collective."""
        pk = self.cfg.data.passkey
        if self.data.passkey_eval is None or not pk.grid_lengths:
            return None
        self.engine.train(False)
        grid = needle_grid(self.cfg.data, self.data.tokenizer, self.cfg.trainer.seed, self.model, self._score_passkey)
        self.engine.train(True)
        return grid

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
