"""Synthetic long-context passkey retrieval: records, the evaluation rows and the needle grid.

A record is filler text with one marked needle, ``<<KEY=31452>>``, at a random depth, followed by
the question ``What is the key? <<KEY=``; the response is the key. Retrieval accuracy by depth and
length (the needle-in-a-haystack grid) shows whether a model uses its whole context.

The data is built so that a small model can learn the task from scratch:

- The filler cannot be memorised: sentences of words drawn at random (Zipf frequencies) from a
  fixed lexicon of pseudo-words (consonant-vowel syllables), new in every document.
- The key is marked by bytes the filler never uses (``<``, ``=``, ``>``, digits), and the question
  ends with the same ``<<KEY=`` marker.
- The digits of a key are distinct (``31452``, never ``31415``). In ``random`` order (the classic
  passkey) reading the key back means copying what follows the marker, one digit after another:
  a two-layer model needs an induction circuit for that, which forms slowly from scratch. In
  ``sorted`` order (``13457``) the key is fully given by *which* digits the needle holds: the model
  must still find them, wherever they are in the context, but not remember their order; a two-layer
  model learns that in minutes on a CPU.
- Documents are long or short (``length_power``): short ones give many keys per token, long ones
  teach the far depths; packing puts several in one sequence.

Generation is deterministic in ``(seed, split)``; the train and eval splits draw separate streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

NEEDLE = "<<KEY={key}>>"
QUESTION = "What is the key? <<KEY="
_SPLITS = {"train": 0, "eval": 1, "grid": 2}
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
LEXICON_SIZE = 2048
"""Pseudo-words of the filler lexicon."""


def _lexicon() -> Tuple[List[str], np.ndarray]:
    """The filler's words (1-3 consonant-vowel syllables, sometimes a closing consonant) and their
    Zipf probabilities; the same for every run (seeded)."""
    rng = np.random.default_rng(20261205)
    words: Dict[str, None] = {}
    while len(words) < LEXICON_SIZE:
        syllables = int(rng.integers(1, 4))
        word = "".join(_CONSONANTS[int(rng.integers(len(_CONSONANTS)))] + _VOWELS[int(rng.integers(len(_VOWELS)))]
                       for _ in range(syllables))
        if rng.random() < 0.3:
            word += _CONSONANTS[int(rng.integers(len(_CONSONANTS)))]
        words[word] = None
    rank = np.arange(1, LEXICON_SIZE + 1, dtype=np.float64)
    return list(words), (1.0 / rank) / (1.0 / rank).sum()


_WORDS, _WORD_P = _lexicon()


def filler_sentences(rng: np.random.Generator, num_chars: int, at_most: bool = False) -> List[str]:
    """Random sentences of lexicon words, ``num_chars`` characters together with their separating spaces.

    Args:
        rng: the generator to draw from.
        num_chars: target length.
        at_most: stop before exceeding ``num_chars`` (else stop once it is reached).
    """
    sentences: List[str] = []
    length = -1
    while length < num_chars:
        words = rng.choice(LEXICON_SIZE, size=int(rng.integers(4, 13)), p=_WORD_P)
        sentence = " ".join(_WORDS[i] for i in words.tolist()).capitalize() + "."
        if at_most and length + 1 + len(sentence) > num_chars:
            break
        sentences.append(sentence)
        length += len(sentence) + 1
    return sentences


KEY_ORDERS = ("random", "sorted")
"""How the distinct digits of a key are ordered (module docstring)."""


def draw_key(rng: np.random.Generator, digits: int, order: str = "random") -> str:
    """A key of ``digits`` distinct digits, the first not zero, in random or increasing order."""
    if order == "sorted":
        return "".join(str(d) for d in sorted((rng.permutation(9)[:digits] + 1).tolist()))
    first = int(rng.integers(1, 10))
    rest = rng.permutation([d for d in range(10) if d != first])[:digits - 1]
    return "".join(str(d) for d in [first, *rest.tolist()])


def make_record(sentences: Sequence[str], cut: int, key: str) -> Dict:
    """The record of filler ``sentences`` with the needle for ``key`` before sentence ``cut``."""
    before, after = " ".join(sentences[:cut]), " ".join(sentences[cut:])
    prompt = " ".join(part for part in (before, NEEDLE.format(key=key), after, QUESTION) if part)
    depth = len(before) / max(len(before) + len(after), 1)
    return {"prompt": prompt, "response": key, "depth": depth}


def passkey_records(num: int, seed: int, min_chars: int, max_chars: int, digits: int,
                    split: str = "train", length_power: float = 1.0, key_order: str = "random") -> List[Dict]:
    """Generate ``num`` passkey records with uniform depths.

    Args:
        num: number of records.
        seed: base seed; each split draws from its own stream, so train and eval never coincide.
        min_chars, max_chars: range of the filler length in characters (rounded up to a sentence).
        digits: number of digits of the key (at most 10: they are distinct).
        split: ``"train"`` or ``"eval"``.
        length_power: the filler length is ``min_chars * (max_chars / min_chars) ** (u ** length_power)``
            for u uniform in [0, 1]: 1 is log-uniform, larger values make short documents more common.
        key_order: ``random`` or ``sorted`` (:func:`draw_key`).

    Returns:
        Dicts with ``prompt`` (filler with the needle, then the question), ``response`` (the key)
        and ``depth`` (position of the needle as a fraction of the filler).
    """
    rng = np.random.default_rng([_SPLITS[split], abs(int(seed))])
    records = []
    for _ in range(num):
        target = int(round(min_chars * (max_chars / min_chars) ** (float(rng.random()) ** length_power)))
        sentences = filler_sentences(rng, target)
        cut = int(round(float(rng.random()) * len(sentences)))
        records.append(make_record(sentences, cut, draw_key(rng, digits, key_order)))
    return records


def passkey_text(record: Dict) -> str:
    """The whole document of a record (pretraining text)."""
    return record["prompt"] + record["response"]


def needle_records(depths: Sequence[float], samples: int, num_tokens: int, tokenizer, seed: int, digits: int,
                   add_bos: bool = True, add_eos: bool = True, key_order: str = "random") -> List[Dict]:
    """``samples`` records at each depth of ``depths``, each as long as fits ``num_tokens`` tokens.

    The filler is filled up to the length (in characters estimated from the tokenizer's characters
    per token on filler text, then shortened sentence by sentence until the record fits), so a
    needle at depth 0.5 sits in the middle of a full context. Deterministic in ``(seed,
    num_tokens)``; every length draws its own keys and filler.

    Raises:
        ValueError: ``num_tokens`` is too short to hold even the needle and the question.
    """
    rng = np.random.default_rng([_SPLITS["grid"], abs(int(seed)), int(num_tokens)])
    special = int(add_bos and tokenizer.bos_id is not None) + int(add_eos and tokenizer.eos_id is not None)
    sample = " ".join(filler_sentences(np.random.default_rng(0), 4000))
    chars_per_token = len(sample) / max(len(tokenizer.encode(sample)), 1)
    overhead = len(tokenizer.encode(make_record([], 0, "9" * digits)["prompt"] + "9" * digits)) + special + 1
    if num_tokens <= overhead:
        raise ValueError(f"data.seq_len: {num_tokens} tokens cannot hold a passkey record (the needle and the "
                         f"question alone take {overhead}); raise data.seq_len")
    records = []
    for depth in depths:
        for _ in range(samples):
            sentences = filler_sentences(rng, int((num_tokens - overhead) * chars_per_token), at_most=True)
            key = draw_key(rng, digits, key_order)
            while True:
                cut = int(round(float(depth) * len(sentences)))
                rec = make_record(sentences, cut, key)
                if len(tokenizer.encode(passkey_text(rec))) + special <= num_tokens or not sentences:
                    break
                sentences = sentences[:-1]
            rec["depth"] = float(depth)  # the grid's depth, exact to the sentence
            records.append(rec)
    return records


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

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

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
