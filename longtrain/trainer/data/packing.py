"""Packing: tokenised documents -> rows of ``seq_len`` tokens, and the packing cache.

Packed row layout, all ``[num_rows, seq_len]``: ``labels[t]`` is the next token when it belongs to
the same document and carries loss (else -100); ``position_ids`` restart at 0 at every document;
``doc_ids`` number the documents of a row 0, 1, 2, ... and the padding at the end of a row is one
more document; ``domains`` (only with a domain field) is the domain id of each token's document,
-1 on padding, and ``domain_names[id]`` its name. Domain ids are given by the sorted names found in
the train and eval data together, so an id means the same domain in both.

The cache (``cache_dir/packed/<hash>/``, memory-mapped ``.npy`` files) is keyed by the tokenised
data's fingerprint and the packing options.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import datasets
import numpy as np

from longtrain.trainer.data.tokenizer import cache_key

_CACHE_VERSION = "1"  # bump when the packing output changes, to invalidate old caches
ROW_ARRAYS = ("input_ids", "labels", "position_ids", "doc_ids")
"""The ``[num_rows, seq_len]`` arrays every packed dataset has (``domains`` is optional)."""


@dataclass
class PackStats:
    """Counts of one packing: input documents, documents split/dropped as overlong, empty ones skipped."""

    num_docs: int = 0
    num_split: int = 0
    num_dropped: int = 0
    num_empty: int = 0
    num_rows: int = 0
    num_tokens: int = 0
    num_padding: int = 0

    @property
    def padding_fraction(self) -> float:
        return self.num_padding / max(self.num_tokens + self.num_padding, 1)


@dataclass
class PackedData:
    """Packed rows, each array ``[num_rows, seq_len]`` (layout in the module docstring).

    ``domains`` and ``domain_names`` are both None when the data has no domain field.
    """

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int64
    position_ids: np.ndarray  # int32
    doc_ids: np.ndarray  # int32
    stats: PackStats
    domains: Optional[np.ndarray] = None  # int32, -1 on padding
    domain_names: Optional[List[str]] = None  # name of each domain id

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def save(self, path: str) -> None:
        """Write ``path/<array>.npy`` (with domains: also ``domains.npy`` and ``domain_names.json``) in a
        temporary folder renamed into place, so a concurrent reader never sees half a cache; if another
        process renamed the same cache first, keep theirs."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
        for name in ROW_ARRAYS:
            np.save(os.path.join(tmp, f"{name}.npy"), getattr(self, name))
        np.save(os.path.join(tmp, "stats.npy"), np.asarray([getattr(self.stats, f.name) for f in fields(PackStats)]))
        if self.domains is not None:
            np.save(os.path.join(tmp, "domains.npy"), self.domains)
            with open(os.path.join(tmp, "domain_names.json"), "w", encoding="utf-8") as f:
                json.dump(list(self.domain_names), f)
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: str) -> "PackedData":
        """Memory-map a saved cache: ranks on one node share the pages instead of each holding a copy.
        A cache without ``domains.npy`` (no domains, or written before domains existed) loads without domains."""
        arrays = [np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r") for name in ROW_ARRAYS]
        stats = PackStats(*(int(v) for v in np.load(os.path.join(path, "stats.npy"))))
        if not os.path.exists(os.path.join(path, "domains.npy")):
            return cls(*arrays, stats)
        with open(os.path.join(path, "domain_names.json"), encoding="utf-8") as f:
            names = json.load(f)
        return cls(*arrays, stats, np.load(os.path.join(path, "domains.npy"), mmap_mode="r"), names)


def pack(docs_ids: Sequence[np.ndarray], docs_mask: Sequence[np.ndarray], seq_len: int, overlong: str = "split",
         pad_id: int = 0, key: str = "data.source", vocab_size: Optional[int] = None,
         doc_domains: Optional[Sequence[int]] = None, domain_names: Optional[Sequence[str]] = None) -> PackedData:
    """Pack whole documents into rows of ``seq_len`` tokens with first-fit decreasing.

    Documents (and pieces of split ones) are placed longest first (ties by input order) into the
    first row with room, found in O(log rows) with a max-segment-tree over the rows' free space;
    the result depends only on the input. A document longer than ``seq_len`` is cut into
    ``seq_len`` pieces, each its own document (``overlong="split"``), or dropped (``"drop"``).

    Args:
        docs_ids, docs_mask: per document, token ids and loss mask (1: the token is a target).
        seq_len: tokens per row.
        overlong: ``"split"`` or ``"drop"``.
        pad_id: id filling the end of rows.
        key: config key named in errors.
        vocab_size: when given, every id must be below it (see :func:`check_token_ids`).
        doc_domains: per document, its domain id (an index into ``domain_names``); every token of
            the document (and of each of its pieces) gets it. None: no domains.
        domain_names: name of each domain id; given exactly when ``doc_domains`` is.

    Raises:
        ValueError: nothing is left to pack, an id is out of the vocabulary, or the domains do not
            match the documents.
    """
    lengths = np.asarray([len(d) for d in docs_ids], dtype=np.int64)
    flat_ids, flat_mask = (np.concatenate([np.asarray(d).reshape(-1) for d in docs] + [np.zeros(0, np.int64)])
                           for docs in (docs_ids, docs_mask))
    if (doc_domains is None) != (domain_names is None):
        raise ValueError("pack: give doc_domains and domain_names together, or neither")
    if doc_domains is not None:
        doc_domains = np.asarray(doc_domains, dtype=np.int32)
        if doc_domains.shape != lengths.shape or (doc_domains.size and not (
                0 <= doc_domains.min() and doc_domains.max() < len(domain_names))):
            raise ValueError(f"pack: doc_domains must hold one id in [0, {len(domain_names)}) per document "
                             f"({len(lengths)} documents), got shape {doc_domains.shape}")
        domain_names = list(domain_names)
    packed = _pack_flat(flat_ids, flat_mask, lengths, seq_len, overlong, pad_id, key, doc_domains, domain_names)
    if vocab_size is not None:
        check_token_ids(packed.input_ids, vocab_size, key)
    return packed


def _pack_flat(flat_ids: np.ndarray, flat_mask: np.ndarray, lengths: np.ndarray, seq_len: int, overlong: str,
               pad_id: int, key: str, doc_domains: Optional[np.ndarray] = None,
               domain_names: Optional[List[str]] = None) -> PackedData:
    """:func:`pack` of documents stored back to back in ``flat_ids``/``flat_mask`` (``lengths`` each)."""
    over = lengths > seq_len
    keep = (lengths > 0) & ~(over & (overlong == "drop"))
    stats = PackStats(num_docs=len(lengths), num_split=int((over & keep).sum()),
                      num_dropped=int((over & ~keep).sum()), num_empty=int((lengths == 0).sum()))
    if not keep.any():
        why = (f"all {stats.num_docs} dropped as longer than data.seq_len={seq_len}; set data.overlong=split "
               "or raise data.seq_len") if stats.num_dropped else f"{stats.num_docs} documents, all empty"
        raise ValueError(f"{key}: no documents left after packing ({why})")
    # Pieces: every kept document cut into seq_len chunks (one chunk unless it is overlong).
    doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])[keep]
    doc_len = lengths[keep]
    num_pieces = -(-doc_len // seq_len)
    piece_doc = np.repeat(np.arange(len(doc_len)), num_pieces)
    piece_k = np.arange(len(piece_doc)) - np.repeat(np.cumsum(num_pieces) - num_pieces, num_pieces)
    piece_start = doc_start[piece_doc] + piece_k * seq_len
    piece_len = np.minimum(seq_len, doc_len[piece_doc] - piece_k * seq_len)

    # First-fit decreasing; free[] is a max-segment-tree over rows (leaves: free tokens of each row).
    order = np.argsort(-piece_len, kind="stable")
    size = 1 << max(int(len(piece_len) - 1).bit_length(), 0)
    free = [seq_len] * (2 * size)
    dest_start, doc_in_row = [0] * len(piece_len), [0] * len(piece_len)
    docs_in_row = [0] * size
    for i, need in zip(order.tolist(), piece_len[order].tolist()):
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        dest_start[i] = row * seq_len + seq_len - free[node]
        doc_in_row[i] = docs_in_row[row]
        docs_in_row[row] += 1
        free[node] -= need
        node //= 2
        while node:
            best = max(free[2 * node], free[2 * node + 1])
            if free[node] == best:
                break
            free[node] = best
            node //= 2
    dest_start, doc_in_row = np.asarray(dest_start, dtype=np.int64), np.asarray(doc_in_row, dtype=np.int32)
    num_rows = int(dest_start.max()) // seq_len + 1

    # Rows are the pieces in destination order, each row closed by its padding (one more document
    # with its own positions): concatenating views of the inputs keeps memory near the output size.
    labels_flat = np.full(len(flat_ids), -100, dtype=np.int64)
    labels_flat[:-1] = np.where(np.asarray(flat_mask)[1:] != 0, flat_ids[1:], -100)
    labels_flat[piece_start + piece_len - 1] = -100  # no label crosses a document (or piece) end
    used = seq_len - np.asarray(free[size:size + num_rows], dtype=np.int64)
    pad_rows = np.flatnonzero(used < seq_len)
    seg_dest = np.concatenate([dest_start, pad_rows * seq_len + used[pad_rows]])
    by = np.argsort(seg_dest, kind="stable")
    seg_start = np.concatenate([piece_start, np.full(len(pad_rows), -1)])[by]  # -1: padding
    seg_len = np.concatenate([piece_len, seq_len - used[pad_rows]])[by]
    seg_doc = np.concatenate([doc_in_row, np.asarray(docs_in_row, dtype=np.int32)[pad_rows]])[by]
    domains = None
    if doc_domains is not None:  # one domain per segment, like doc_ids: a piece keeps its document's
        seg_domain = np.concatenate([doc_domains[keep][piece_doc], np.full(len(pad_rows), -1, dtype=np.int32)])[by]
        domains = np.repeat(seg_domain.astype(np.int32), seg_len).reshape((num_rows, seq_len))
    pad_ids, pad_labels = np.full(seq_len, pad_id, dtype=flat_ids.dtype), np.full(seq_len, -100, dtype=np.int64)
    ids_parts, label_parts = [], []
    for start, n in zip(seg_start.tolist(), seg_len.tolist()):
        ids_parts.append(pad_ids[:n] if start < 0 else flat_ids[start:start + n])
        label_parts.append(pad_labels[:n] if start < 0 else labels_flat[start:start + n])
    shape = (num_rows, seq_len)
    input_ids = np.concatenate(ids_parts).astype(np.int32, copy=False).reshape(shape)
    labels = np.concatenate(label_parts).reshape(shape)
    arange = np.arange(seq_len, dtype=np.int32)
    position_ids = np.concatenate([arange[:n] for n in seg_len.tolist()]).reshape(shape)
    doc_ids = np.repeat(seg_doc.astype(np.int32), seg_len).reshape(shape)
    stats.num_rows, stats.num_tokens = num_rows, int(piece_len.sum())
    stats.num_padding = num_rows * seq_len - stats.num_tokens
    return PackedData(input_ids, labels, position_ids, doc_ids, stats, domains, domain_names)


def check_token_ids(input_ids: np.ndarray, vocab_size: int, key: str = "data.source",
                    tokenizer_vocab_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` when an id is outside the model vocabulary ``[0, vocab_size)``."""
    top = int(input_ids.max()) if input_ids.size else -1
    if top >= vocab_size or (input_ids.size and int(input_ids.min()) < 0):
        need = max(top + 1, tokenizer_vocab_size or 0)
        raise ValueError(f"{key}: token id {top} is out of range for the model vocabulary of size {vocab_size}; "
                         f"set model.vocab_size to at least {need} (the tokenizer's vocabulary size)")


def _flat_docs(ds: datasets.Dataset):
    """A tokenised dataset as flat ``input_ids``, ``loss_mask`` and per-document lengths (no Python lists)."""
    ds = ds.flatten_indices() if ds._indices is not None else ds
    out = []
    for name in ("input_ids", "loss_mask"):
        arr = ds.data.column(name).combine_chunks()
        out.append(arr.flatten().to_numpy(zero_copy_only=False))
    offsets = arr.offsets.to_numpy()
    return out[0], out[1], np.diff(offsets).astype(np.int64)


def pack_cached(tokenized: datasets.Dataset, seq_len: int, overlong: str, pad_id: int,
                cache_dir: Optional[str], key: str = "data.source", doc_domains: Optional[np.ndarray] = None,
                domain_names: Optional[List[str]] = None) -> PackedData:
    """:func:`pack` a tokenised dataset, reusing (memory-mapping) ``cache_dir/packed/<hash>/`` when present.

    ``doc_domains`` (int32, one id per record) and ``domain_names`` are as in :func:`pack`; they are
    part of the cache key, which without domains is the same as before domains existed.
    """
    parts = [tokenized._fingerprint, seq_len, overlong, pad_id, _CACHE_VERSION]
    if doc_domains is not None:
        parts += [hashlib.sha256(np.ascontiguousarray(doc_domains, dtype=np.int32).tobytes()).hexdigest(),
                  domain_names]
    path = os.path.join(cache_dir, "packed", cache_key(parts)) if cache_dir else None
    if path and os.path.isdir(path):
        return PackedData.load(path)
    packed = _pack_flat(*_flat_docs(tokenized), seq_len, overlong, pad_id, key, doc_domains, domain_names)
    if not path:
        return packed
    packed.save(path)
    return PackedData.load(path)

