"""Data: load records, tokenise (cached by ``datasets``), pack documents into rows, sample global batches.

Path of the data: ``load_records`` (local files or a ``save_to_disk`` folder) or the passkey or
domains generator -> ``tokenize`` (``input_ids`` and ``loss_mask`` per document, cached as Arrow
files) -> ``pack`` (whole documents into rows of ``seq_len`` tokens with labels, positions, document
ids and optionally domain ids, cached as memory-mapped ``.npy``) -> ``GlobalBatchSampler`` (which rows
form the global batch of a step) -> ``collate`` and ``collate_domains`` (rows as int64 tensors).

Packed row layout, all ``[num_rows, seq_len]``: ``labels[t]`` is the next token when it belongs to
the same document and carries loss (else -100); ``position_ids`` restart at 0 at every document;
``doc_ids`` number the documents of a row 0, 1, 2, ... and the padding at the end of a row is one
more document; ``domains`` (only with a domain field) is the domain id of each token's document,
-1 on padding, and ``domain_names[id]`` its name. Domain ids are given by the sorted names found in
the train and eval data together, so an id means the same domain in both.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from longtrain.config import DataConfig
from longtrain.trainer.domains import domain_records
from longtrain.trainer.passkey import PasskeyEval, passkey_records, passkey_text
from longtrain.trainer.tokenizer import cache_key, load_tokenizer, tokenize  # noqa: F401 (re-exported)

_EXT_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_EXPECTED = "expected 'passkey', 'domains', a .jsonl/.json/.parquet/.txt file, a folder of such files or a save_to_disk folder"
_CACHE_VERSION = "1"  # bump when the packing output changes, to invalidate old caches
_UTF8_CHECK_BYTES = 1 << 20
_ARRAYS = ("input_ids", "labels", "position_ids", "doc_ids")
_BUILTIN = ("passkey", "domains")


# ---------------------------------------------------------------------------------------- loading

def load_records(source: str, key: str = "data.source", cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Load local records as a ``datasets.Dataset``.

    Args:
        source: a .jsonl/.json/.parquet/.txt file, a folder of files with one of those extensions
            (searched recursively), or a folder written by ``save_to_disk`` (a ``DatasetDict`` gives
            its ``train`` split). A .txt file is one document (``text`` field), not one per line.
        key: config key named in errors.
        cache_dir: ``datasets`` cache for the converted files (null: the ``datasets`` default).

    Raises:
        ValueError: missing path, unsupported extension, empty or non-UTF-8 file, no records.
    """
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(path):
        raise ValueError(f"{key}: {source!r} does not exist ({_EXPECTED})")
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise ValueError(f"{key}: {source!r} is a DatasetDict without a 'train' split "
                                     f"(splits: {', '.join(ds)})")
                ds = ds["train"]
            if len(ds) == 0:
                raise ValueError(f"{key}: {source!r} holds no records")
            return ds
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                       if not f.startswith(".") and os.path.splitext(f)[1].lower() in _EXT_BUILDER)
        builders = {_EXT_BUILDER[os.path.splitext(f)[1].lower()] for f in files}
        if not files:
            raise ValueError(f"{key}: folder {source!r} holds no {'/'.join(_EXT_BUILDER)} files ({_EXPECTED})")
        if len(builders) > 1:
            raise ValueError(f"{key}: folder {source!r} mixes file types ({', '.join(sorted(builders))}); "
                             "keep one format per folder")
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _EXT_BUILDER:
            raise ValueError(f"{key}: unsupported extension {ext or '(none)'!r} of {source!r} "
                             f"(supported: {', '.join(_EXT_BUILDER)}; or a folder written by save_to_disk)")
        files = [path]
    builder = _EXT_BUILDER[os.path.splitext(files[0])[1].lower()]
    for f in files:
        _precheck_file(f, builder, key)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
    except StopIteration:  # datasets 5.2's json builder raises this for an input without records
        raise ValueError(f"{key}: {source!r} holds no records") from None
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        if isinstance(cause, UnicodeDecodeError):
            raise ValueError(f"{key}: {source!r} is not UTF-8 text ({cause.reason}); re-encode it as UTF-8") from e
        bad = _first_bad_json(files) if builder == "json" else None
        raise ValueError(f"{key}: {bad or f'cannot read {source!r} as {builder}: {type(cause).__name__}: {cause}'}") from e
    except ValueError as e:  # e.g. 'Instruction "train" corresponds to no data!' for a json file holding []
        bad = _first_bad_json(files) if builder == "json" else None
        raise ValueError(f"{key}: {source!r} holds no records ({e})" if "no data" in str(e)
                         else f"{key}: {bad or f'cannot read {source!r} as {builder}: {e}'}") from e
    if len(ds) == 0:
        raise ValueError(f"{key}: {source!r} holds no records")
    return ds


def _first_bad_json(files: Sequence[str]) -> Optional[str]:
    """Where the first malformed record of these JSON files is (the json builder's own error names
    a row of an internal block, not a line of a file): ``line N of 'f.jsonl' is not valid JSON (...)``.

    Only called after loading failed, so its full read of each file costs nothing in a good run.
    """
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not path.lower().endswith(".jsonl"):  # one JSON document, or JSON lines under a .json name
            try:
                json.loads(text)
                continue
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":
                    return f"{path!r} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        for num, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {num} of {path!r} is not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(record, dict):
                return f"line {num} of {path!r} is not a JSON object (one record per line; got {type(record).__name__})"
    return None


def _precheck_file(path: str, builder: str, key: str) -> None:
    """Fail early on empty files and on text files whose first MiB is not UTF-8.

    The json builder accepts invalid UTF-8 and fails only when the string is read, so the check
    is done here; the rest of a large file is checked when it is tokenised.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{key}: {path!r} is empty")
    if builder == "parquet":
        return
    with open(path, "rb") as f:
        head = f.read(_UTF8_CHECK_BYTES)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) == size)
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}: {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         "re-encode it as UTF-8") from None
    if len(head) == size and not text.strip():
        raise ValueError(f"{key}: {path!r} is empty")


def _domain_labels(ds: datasets.Dataset, field: str, key: str, source: str) -> pa.ChunkedArray:
    """The domain name of every record of ``ds`` (its ``field`` column), checked to be text in every record.

    Raises:
        ValueError: ``field`` is missing from a record or is not text.
    """
    fix = ("add it to every record, or set data.domain_field to the field holding each record's domain "
           "(null: no domains)")
    if field not in ds.column_names:
        raise ValueError(f"{key}: records of {source} have no domain field {field!r} (fields: "
                         f"{', '.join(ds.column_names)}); {fix}")
    ds = ds.flatten_indices() if ds._indices is not None else ds
    labels = ds.data.column(field)
    if labels.null_count:
        first = pc.index(pc.is_null(labels), True).as_py()
        raise ValueError(f"{key}: record {first} of {source} has no domain field {field!r}; {fix}")
    if not (pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type)):
        raise ValueError(f"{key}: domain field {field!r} of {source} holds {labels.type}, not text; "
                         "give each record's domain as a name, or set data.domain_field to the field holding it")
    return labels


# ---------------------------------------------------------------------------------------- packing

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
        for name in _ARRAYS:
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
        arrays = [np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r") for name in _ARRAYS]
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


# ---------------------------------------------------------------------------------------- batches

class GlobalBatchSampler:
    """Rows of each step's global batch, a function of (step, seed, global batch size) only.

    The data is an endless stream: position ``p = step * G + i`` is row ``perm(seed, e)[p % N]`` of
    epoch ``e = p // N``, each epoch a fresh permutation. The layout (dp degree, accumulation) only
    decides which rank sees which rows, so runs with different layouts train on the same batches.
    """

    def __init__(self, num_rows: int, global_batch_size: int, seed: int) -> None:
        if num_rows < 1 or global_batch_size < 1:
            raise ValueError(f"need num_rows >= 1 and data.global_batch_size >= 1, got {num_rows}, {global_batch_size}")
        self.num_rows, self.global_batch_size, self.seed = num_rows, global_batch_size, seed
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            gen = np.random.Generator(np.random.PCG64([abs(int(self.seed)), epoch]))
            self._perms[epoch] = gen.permutation(self.num_rows)
        return self._perms[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """The ``G`` row indices of step ``step``, in global order."""
        pos = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
        epochs, within = pos // self.num_rows, pos % self.num_rows
        out = np.empty_like(pos)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out

    def local_micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                            grad_accum: int) -> List[np.ndarray]:
        """This rank's ``grad_accum`` micro-batches of step ``step``.

        The global rows are cut into ``grad_accum * dp_size`` contiguous blocks of
        ``micro_batch_size``; micro-batch ``m`` of rank ``r`` is block ``m * dp_size + r``.

        Raises:
            ValueError: ``G != micro_batch_size * grad_accum * dp_size``.
        """
        g, per_step = self.global_batch_size, micro_batch_size * grad_accum * dp_size
        if g != per_step:
            fix = f"set data.global_batch_size={per_step}"
            if g % (micro_batch_size * dp_size) == 0:
                fix += f" or trainer.grad_accum={g // (micro_batch_size * dp_size)}"
            raise ValueError(f"data.global_batch_size={g} must equal data.micro_batch_size ({micro_batch_size}) "
                             f"x trainer.grad_accum ({grad_accum}) x data-parallel degree ({dp_size}) "
                             f"= {per_step}; {fix}")
        rows = self.global_indices(step)
        return [rows[(m * dp_size + dp_rank) * micro_batch_size:][:micro_batch_size] for m in range(grad_accum)]


def collate(packed: PackedData, rows: np.ndarray) -> Dict[str, torch.Tensor]:
    """Rows ``rows`` of ``packed`` as int64 tensors ``[B, S]``: input_ids, labels, position_ids, doc_ids."""
    rows = np.asarray(rows, dtype=np.int64)
    return {name: torch.from_numpy(np.asarray(getattr(packed, name)[rows], dtype=np.int64)) for name in _ARRAYS}


def collate_domains(packed: PackedData, rows: np.ndarray) -> Optional[torch.Tensor]:
    """Domain ids of rows ``rows`` of ``packed`` as an int64 tensor ``[B, S]`` (-1 on padding; names in
    ``packed.domain_names``), or None when the data has no domains."""
    if packed.domains is None:
        return None
    return torch.from_numpy(np.asarray(packed.domains[np.asarray(rows, dtype=np.int64)], dtype=np.int64))


# ----------------------------------------------------------------------------------------- bundle

@dataclass
class DataBundle:
    """Everything the trainer needs from the data side."""

    train: PackedData
    eval: Optional[PackedData]
    passkey_eval: Optional[PasskeyEval]
    tokenizer: object
    stats: Dict[str, PackStats]


def build_datasets(cfg: DataConfig, vocab_size: int, seed: int, rank: int = 0,
                   barrier: Optional[Callable[[], None]] = None, log: Callable[[str], None] = print) -> DataBundle:
    """Tokenise and pack the train (and eval) data, with caches prepared by rank 0 first.

    Rank 0 builds (or loads) every cache, then all ranks meet at ``barrier``, then the other ranks
    build the same bundle, which now only reads caches, so ranks never race on cache files. If
    rank 0 fails with a user error it still reaches the barrier, and the other ranks then hit the
    same error themselves instead of hanging. With a node-local ``cache_dir`` pass the local rank.

    Args:
        cfg: the data config.
        vocab_size: the model's vocabulary size; every token id must be below it.
        seed: seed of the passkey and domains generators (the train and eval splits draw separate streams).
        rank: this process's rank (0 prepares the caches and logs).
        barrier: called once by every rank between the two phases (None: single process).
        log: receives one line of packing statistics (rank 0 only).
    """
    error: Optional[BaseException] = None
    bundle = None
    if rank == 0:
        try:
            bundle = _build(cfg, vocab_size, seed, log)
        except ValueError as e:
            error = e
    if barrier is not None:
        barrier()
    if error is not None:
        raise error
    return bundle if bundle is not None else _build(cfg, vocab_size, seed, lambda _msg: None)


def _build(cfg: DataConfig, vocab_size: int, seed: int, log: Callable[[str], None]) -> DataBundle:
    tok = load_tokenizer(cfg.tokenizer)
    cache_dir = os.path.abspath(os.path.expanduser(cfg.cache_dir or "~/.cache/longtrain"))
    pk, dm = cfg.passkey, cfg.domains

    def records(source: str, key: str, split: str) -> Tuple[datasets.Dataset, str, str]:
        """The records of one split, the field holding their text and how errors name them."""
        if source == "passkey":
            num = pk.num_train if split == "train" else pk.num_eval
            recs = passkey_records(num, seed, pk.min_chars, pk.max_chars, pk.digits, split=split)
            if cfg.mode == "pretrain":
                ds = datasets.Dataset.from_list([{"text": passkey_text(r)} for r in recs])
            else:
                ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "response": r["response"]} for r in recs])
            return ds, "text", f"passkey {split} records"
        if source == "domains":
            num = dm.num_train if split == "train" else dm.num_eval
            recs = domain_records(num, seed, dm.min_chars, dm.max_chars, dm.names, dm.mix, split=split)
            return datasets.Dataset.from_list(recs), "text", f"domains {split} records"
        return load_records(source, key, os.path.join(cache_dir, "datasets")), cfg.text_field, repr(source)

    builtin_eval = {"passkey": pk.num_eval, "domains": dm.num_eval}
    eval_source = cfg.eval_source or (cfg.source if cfg.source in _BUILTIN else None)
    splits = {"train": ("data.source", *records(cfg.source, "data.source", "train"))}
    if eval_source is not None and builtin_eval.get(eval_source, 1) > 0:
        splits["eval"] = ("data.eval_source", *records(eval_source, "data.eval_source", "eval"))

    # Domain ids from the names of both splits together, so that an id means the same domain in each.
    domain_field = cfg.domain_field or ("domain" if "domains" in (cfg.source, cfg.eval_source) else None)
    doc_domains: Dict[str, Optional[np.ndarray]] = {split: None for split in splits}
    names = None
    if domain_field is not None:
        labels = {split: _domain_labels(ds, domain_field, key, origin)
                  for split, (key, ds, _, origin) in splits.items()}
        names = sorted(set().union(*(pc.unique(col).to_pylist() for col in labels.values())))
        doc_domains = {split: pc.index_in(col, value_set=pa.array(names, type=col.type)).to_numpy().astype(np.int32)
                       for split, col in labels.items()}

    packed = {}
    for split, (key, ds, field, origin) in splits.items():
        tokenized = tokenize(ds, tok, cfg.mode, field, cfg.add_bos, cfg.add_eos, cache_dir, key, origin)
        packed[split] = pack_cached(tokenized, cfg.seq_len, cfg.overlong, tok.pad_id, cache_dir, key,
                                    doc_domains[split], names)
        check_token_ids(packed[split].input_ids, vocab_size, key, tok.vocab_size)
    train, evaluation = packed["train"], packed.get("eval")
    passkey_eval = None
    if eval_source == "passkey" and evaluation is not None:
        recs = passkey_records(pk.num_eval, seed, pk.min_chars, pk.max_chars, pk.digits, split="eval")
        passkey_eval = PasskeyEval.from_records(recs, tok, cfg.seq_len, cfg.add_bos, cfg.add_eos)
        check_token_ids(passkey_eval.input_ids, vocab_size, "data.eval_source", tok.vocab_size)
    stats = {split: p.stats for split, p in packed.items()}
    s = train.stats
    line = (f"data: train {s.num_docs} docs ({s.num_split} split, {s.num_dropped} dropped) -> {s.num_rows} rows "
            f"x {cfg.seq_len} tokens, {100 * s.padding_fraction:.1f}% padding")
    if evaluation is not None:
        line += f"; eval {evaluation.stats.num_docs} docs -> {evaluation.num_rows} rows"
    if passkey_eval is not None:
        line += f"; passkey eval {passkey_eval.num_rows} records"
    if names is not None:
        line += f"; domains {', '.join(names)}"
    log(line)
    return DataBundle(train, evaluation, passkey_eval, tok, stats)
