"""Synthetic long-context passkey retrieval: records and the evaluation set.

A record is filler text with one sentence giving a random number (the pass key) hidden at a random
depth, followed by a question; the response is the key. Retrieval accuracy as a function of depth
shows whether a model uses its whole context. Generation is deterministic in ``(seed, split)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
QUESTION = "What is the pass key? The pass key is"
_SPLITS = {"train": 0, "eval": 1}


def passkey_records(num: int, seed: int, min_chars: int, max_chars: int, digits: int,
                    split: str = "train") -> List[Dict]:
    """Generate ``num`` passkey records.

    Args:
        num: number of records.
        seed: base seed; each split draws from its own stream, so train and eval never coincide.
        min_chars, max_chars: range of the filler length in characters (rounded up to a sentence).
        digits: number of digits of the key (no leading zero).
        split: ``"train"`` or ``"eval"``.

    Returns:
        Dicts with ``prompt`` (filler with the key sentence, then the question), ``response``
        (``" <key>"``) and ``depth`` (position of the key sentence as a fraction of the filler).
    """
    rng = np.random.default_rng([_SPLITS[split], abs(int(seed))])
    records = []
    for _ in range(num):
        target = int(rng.integers(min_chars, max_chars + 1))
        sentences: List[str] = []
        length = -1
        while length < target:
            sentences.append(FILLER[int(rng.integers(len(FILLER)))])
            length += len(sentences[-1]) + 1
        cut = int(round(float(rng.random()) * len(sentences)))
        before, after = " ".join(sentences[:cut]), " ".join(sentences[cut:])
        key = int(rng.integers(10 ** (digits - 1), 10 ** digits))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        prompt = " ".join(part for part in (before, needle, after, QUESTION) if part)
        depth = len(before) / max(len(before) + len(after), 1)
        records.append({"prompt": prompt, "response": f" {key}", "depth": depth})
    return records


def passkey_text(record: Dict) -> str:
    """The whole document of a record (pretraining text)."""
    return record["prompt"] + record["response"]


@dataclass
class PasskeyEval:
    """Passkey evaluation set: one record per row, padded to ``seq_len``.

    ``labels`` are next-token labels over the whole document (like pretraining data);
    ``answer_mask[r, t]`` is true where the label of position ``t`` is a token of the response, so a
    record is retrieved when the argmax prediction is right at every answer position.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    answer_mask: np.ndarray
    depth: np.ndarray

    @classmethod
    def from_records(cls, records: Sequence[Dict], tokenizer, seq_len: int,
                     add_bos: bool = True, add_eos: bool = True) -> "PasskeyEval":
        """Tokenise ``records`` (bos + prompt + response (+ eos)) into rows.

        Raises:
            ValueError: a record does not fit in ``seq_len`` tokens.
        """
        n = len(records)
        input_ids = np.full((n, seq_len), tokenizer.pad_id, dtype=np.int64)
        labels = np.full((n, seq_len), -100, dtype=np.int64)
        position_ids = np.zeros((n, seq_len), dtype=np.int64)
        doc_ids = np.zeros((n, seq_len), dtype=np.int64)
        answer_mask = np.zeros((n, seq_len), dtype=bool)
        for r, rec in enumerate(records):
            bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
            eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
            prompt = bos + tokenizer.encode(rec["prompt"])
            response = tokenizer.encode(rec["response"])
            ids = prompt + response + eos
            if len(ids) > seq_len:
                raise ValueError(
                    f"data.passkey.max_chars: a passkey eval record has {len(ids)} tokens, more than "
                    f"data.seq_len={seq_len}; lower data.passkey.max_chars or raise data.seq_len")
            length = len(ids)
            input_ids[r, :length] = ids
            labels[r, : length - 1] = ids[1:]
            position_ids[r, :length] = np.arange(length)
            position_ids[r, length:] = np.arange(seq_len - length)
            doc_ids[r, length:] = 1
            answer_mask[r, len(prompt) - 1: len(prompt) - 1 + len(response)] = True
        depth = np.asarray([float(rec["depth"]) for rec in records], dtype=np.float64)
        return cls(input_ids, labels, position_ids, doc_ids, answer_mask, depth)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, rows: np.ndarray) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Rows ``rows`` as (batch dict like ``collate``, answer_mask [B, S] bool, depth [B] float)."""
        rows = np.asarray(rows, dtype=np.int64)
        batch = {name: torch.from_numpy(getattr(self, name)[rows]) for name in
                 ("input_ids", "labels", "position_ids", "doc_ids")}
        return batch, torch.from_numpy(self.answer_mask[rows]), torch.from_numpy(self.depth[rows])

    @staticmethod
    def accuracy_by_depth(correct: Sequence[bool], depth: Sequence[float], num_bins: int = 5) -> Dict[str, float]:
        """Overall accuracy and accuracy per depth bin (percent ranges; empty bins are left out).

        Returns:
            e.g. ``{"passkey_acc": 0.4, "passkey_acc_depth_0-20": 0.5, ..., "passkey_acc_depth_80-100": 0.25}``.
        """
        correct_a = np.asarray(correct, dtype=np.float64).reshape(-1)
        depth_a = np.asarray(depth, dtype=np.float64).reshape(-1)
        if correct_a.shape != depth_a.shape:
            raise ValueError(f"correct and depth differ in length: {correct_a.size} vs {depth_a.size}")
        if correct_a.size == 0:
            return {}
        out = {"passkey_acc": float(correct_a.mean())}
        bins = np.clip((depth_a * num_bins).astype(np.int64), 0, num_bins - 1)
        for b in range(num_bins):
            sel = bins == b
            if sel.any():
                lo, hi = round(100 * b / num_bins), round(100 * (b + 1) / num_bins)
                out[f"passkey_acc_depth_{lo}-{hi}"] = float(correct_a[sel].mean())
        return out
