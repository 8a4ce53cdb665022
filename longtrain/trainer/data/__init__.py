"""Data: load records, tokenise (cached by ``datasets``), pack documents into rows, sample global batches.

Path of the data: ``load_records`` (local files or a ``save_to_disk`` folder) or the passkey or
domains generator -> ``tokenize`` (``input_ids`` and ``loss_mask`` per document, cached as Arrow
files) -> ``pack`` (whole documents into rows of ``seq_len`` tokens with labels, positions, document
ids and optionally domain ids, cached as memory-mapped ``.npy``) -> ``GlobalBatchSampler`` (which rows
form the global batch of a step) -> ``collate`` and ``collate_domains`` (rows as int64 tensors).

Modules, in that order: ``sources`` (records from files and the ``passkey`` and ``domains``
generators), ``tokenizer`` (tokenizers and the tokenisation cache), ``packing`` (rows, their layout
and the packing cache), ``sampler`` (global batches and collation) and ``pipeline``
(:func:`build_datasets`, all of it for one run). ``passkey`` and ``domains`` hold the generators
of the embedded datasets. Every public name is importable from ``longtrain.trainer.data``.
"""
from longtrain.trainer.data.domains import DOMAIN_NAMES, domain_probabilities, domain_records
from longtrain.trainer.data.packing import ROW_ARRAYS, PackedData, PackStats, check_token_ids, pack, pack_cached
from longtrain.trainer.data.passkey import PasskeyEval, needle_records, passkey_records, passkey_text
from longtrain.trainer.data.pipeline import DataBundle, build_datasets, cache_root, passkey_eval_set
from longtrain.trainer.data.sampler import GlobalBatchSampler, collate, collate_domains
from longtrain.trainer.data.sources import BUILTIN_SOURCES, domain_labels, load_records, split_records
from longtrain.trainer.data.tokenizer import (ByteTokenizer, HFTokenizer, cache_key, encode_example, load_tokenizer,
                                              tokenize)

__all__ = [
    "BUILTIN_SOURCES", "ByteTokenizer", "DOMAIN_NAMES", "DataBundle", "GlobalBatchSampler", "HFTokenizer",
    "PackStats", "PackedData", "PasskeyEval", "ROW_ARRAYS", "build_datasets", "cache_key", "cache_root", "check_token_ids",
    "collate", "collate_domains", "domain_labels", "domain_probabilities", "domain_records", "encode_example",
    "load_records", "load_tokenizer", "needle_records", "pack", "pack_cached", "passkey_eval_set", "passkey_records",
    "passkey_text", "split_records",
    "tokenize",
]
