"""Passkey retrieval scoring and the needle-in-a-haystack grid, shared by the trainer's evaluation
(:mod:`longtrain.trainer.evaluate`, sharded over the run's layout) and ``longtrain-eval`` (one
process).

A row is retrieved when the argmax prediction is right at every answer position (teacher forcing:
each digit is predicted from the true digits before it). The grid evaluates
``data.passkey.grid_samples`` keys at each of ``data.passkey.depths`` depths (0 to 100% of the
filler) for every length of ``data.passkey.grid_lengths`` (multiples of ``data.seq_len``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from longtrain.config import DataConfig
from longtrain.models.rope import check_rope_scaling
from longtrain.trainer.data import PasskeyEval, passkey_eval_set

RowResult = Tuple[bool, float, float]
"""(whole key right, fraction of the key's tokens right, depth) of one evaluated row."""


def answer_hits(forward: Callable, labels: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Where the argmax prediction equals the label, at the answer positions ([B, S] bool, False elsewhere).

    Args:
        forward: ``forward(head)`` runs the model on the batch and returns ``head(hidden, lm_head_weight)``.
        labels: [B, S] labels of the batch.
        answer_mask: [B, S] bool, the answer positions.
    """
    logits = forward(lambda hidden, weight: hidden[answer_mask].float() @ weight.float().t())
    hit = torch.zeros_like(answer_mask)
    hit[answer_mask] = logits.argmax(-1) == labels[answer_mask]
    return hit


def score_passkey(pk: PasskeyEval, rows: np.ndarray, micro_batch_size: int,
                  hits: Callable[[Dict[str, torch.Tensor], torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
                  sp_sum: Callable[[torch.Tensor], torch.Tensor] = lambda counts: counts) -> List[RowResult]:
    """Score the rows ``rows`` of ``pk``, ``micro_batch_size`` at a time.

    Args:
        hits: ``hits(batch, answer_mask)`` -> (argmax right, answer mask), both [B, S_local] bool for this
            rank's part of each row (:func:`answer_hits` after sharding).
        sp_sum: sums a tensor over the ranks that hold parts of the same rows (sequence parallelism).
    """
    results: List[RowResult] = []
    for i in range(0, len(rows), micro_batch_size):
        full, answer_mask, depth = pk.batch(rows[i:i + micro_batch_size])
        hit, mask = hits(full, answer_mask)
        counts = sp_sum(torch.stack([hit.sum(1), mask.sum(1)]).double())
        whole = (counts[0] == counts[1]).tolist()
        fraction = (counts[0] / counts[1].clamp(min=1)).tolist()
        results += list(zip(whole, fraction, depth.tolist()))
    return results


def needle_sets(cfg: DataConfig, tokenizer, seed: int) -> List[Tuple[int, PasskeyEval, Optional[Dict]]]:
    """(multiple, rows, RoPE scaling or None) of every grid length ``data.passkey.grid_lengths`` x
    ``data.seq_len``; lengths beyond 1x get ``data.passkey.grid_rope_scaling`` when it is set."""
    pk = cfg.passkey
    return [(m, passkey_eval_set(cfg, tokenizer, seed, m * cfg.seq_len, pk.grid_samples),
             dict(pk.grid_rope_scaling) if m > 1 and pk.grid_rope_scaling else None) for m in pk.grid_lengths]


def needle_grid(cfg: DataConfig, tokenizer, seed: int, model,
                score: Callable[[PasskeyEval], List[RowResult]]) -> Dict:
    """The needle grid of ``cfg.passkey`` (lengths x depths) as :func:`grid_table` gives it: the rows
    of every length (:func:`needle_sets`) scored by ``score(rows)`` with ``model``'s RoPE scaled for it."""
    results = []
    for multiple, rows, scaling in needle_sets(cfg, tokenizer, seed):
        with scaled(model, scaling):
            results.append((multiple, rows.seq_len, score(rows)))
    return grid_table(results, cfg.passkey.grid_samples, dict(cfg.passkey.grid_rope_scaling) or None)


@contextlib.contextmanager
def scaled(model, scaling: Optional[Dict]):
    """``model`` with RoPE scaling ``scaling`` inside the block (nothing changes for None)."""
    if scaling is None:
        yield model
    else:
        with model.rope_scaling(scaling):
            yield model


def grid_table(results: Sequence[Tuple[int, int, Sequence[RowResult]]], samples: int,
               rope_scaling: Optional[Dict] = None) -> Dict:
    """The grid of ``(multiple, length, row results)`` per length as a JSON-able dict.

    Returns:
        ``{"lengths": [tokens], "multiples": [...], "depths": [...], "samples": n, "acc": [[depth x length]],
        "digit_acc": [[...]], "overall": [per length], "overall_digit": [per length], "rope_scaling": the
        scaling of the lengths beyond 1x or None}``; a cell without rows is None.
    """
    depths = sorted({d for _, _, rows in results for _, _, d in rows})
    acc: List[List[Optional[float]]] = [[None] * len(results) for _ in depths]
    digit: List[List[Optional[float]]] = [[None] * len(results) for _ in depths]
    overall, overall_digit = [], []
    for j, (_, _, rows) in enumerate(results):
        for i, depth in enumerate(depths):
            cell = [(w, f) for w, f, d in rows if math.isclose(d, depth)]
            if cell:
                acc[i][j] = float(np.mean([w for w, _ in cell]))
                digit[i][j] = float(np.mean([f for _, f in cell]))
        overall.append(float(np.mean([w for w, _, _ in rows])) if rows else None)
        overall_digit.append(float(np.mean([f for _, f, _ in rows])) if rows else None)
    return {"lengths": [n for _, n, _ in results], "multiples": [m for m, _, _ in results], "depths": depths,
            "samples": samples, "acc": acc, "digit_acc": digit, "overall": overall, "overall_digit": overall_digit,
            "rope_scaling": check_rope_scaling(rope_scaling)}  # rope_type default: None
