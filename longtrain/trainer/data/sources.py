"""Where records come from: local files or a ``save_to_disk`` folder, and the embedded passkey
and domains generators. Each split of the data is a ``datasets.Dataset`` of records before
tokenisation; the domain field of the records is read here too.
"""
from __future__ import annotations

import codecs
import json
import os
from typing import Optional, Sequence, Tuple

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from longtrain.config import DataConfig
from longtrain.trainer.data.domains import domain_records
from longtrain.trainer.data.passkey import passkey_records, passkey_text

BUILTIN_SOURCES = ("passkey", "domains")
"""Sources generated in memory rather than read from files."""
_EXT_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_EXPECTED = "expected 'passkey', 'domains', a .jsonl/.json/.parquet/.txt file, a folder of such files or a save_to_disk folder"
_UTF8_CHECK_BYTES = 1 << 20


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



def split_records(cfg: DataConfig, source: str, key: str, split: str, seed: int,
                  cache_dir: str) -> Tuple[datasets.Dataset, str, str]:
    """The records of one split, the field holding their text and how errors name them.

    Args:
        cfg: the data config (the passkey and domains settings, the mode, the text field).
        source: ``passkey``, ``domains`` or a path for :func:`load_records`.
        key: config key named in errors.
        split: ``"train"`` or ``"eval"`` (the generators draw a separate stream for each).
        seed: seed of the passkey and domains generators.
        cache_dir: the data cache; files converted by ``datasets`` go to ``cache_dir/datasets``.
    """
    pk, dm = cfg.passkey, cfg.domains
    if source == "passkey":
        num = pk.num_train if split == "train" else pk.num_eval
        recs = passkey_records(num, seed, pk.min_chars, pk.max_chars, pk.digits, split=split,
                               length_power=pk.length_power, key_order=pk.key_order)
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


def domain_labels(ds: datasets.Dataset, field: str, key: str, source: str) -> pa.ChunkedArray:
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
