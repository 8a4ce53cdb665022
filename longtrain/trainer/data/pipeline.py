"""The data side of a run end to end: :func:`build_datasets` turns the data config into the
packed train and eval data, the passkey evaluation set and the tokenizer, with every cache
prepared by one rank first."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longtrain.config import DataConfig
from longtrain.trainer.data.packing import PackedData, PackStats, check_token_ids, pack_cached
from longtrain.trainer.data.passkey import PasskeyEval, needle_records
from longtrain.trainer.data.sources import BUILTIN_SOURCES, domain_labels, split_records
from longtrain.trainer.data.tokenizer import load_tokenizer, tokenize


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
        except (ValueError, OSError) as e:  # the other ranks must still reach the barrier
            error = e
    if barrier is not None:
        barrier()
    if error is not None:
        raise error
    return bundle if bundle is not None else _build(cfg, vocab_size, seed, lambda _msg: None)



def cache_root(cfg: DataConfig) -> str:
    """The data cache directory, absolute: ``data.cache_dir``, or ``~/.cache/longtrain`` when null."""
    return os.path.abspath(os.path.expanduser(cfg.cache_dir or "~/.cache/longtrain"))


def _build(cfg: DataConfig, vocab_size: int, seed: int, log: Callable[[str], None]) -> DataBundle:
    tok = load_tokenizer(cfg.tokenizer)
    cache_dir = cache_root(cfg)
    pk, dm = cfg.passkey, cfg.domains

    builtin_eval = {"passkey": pk.num_eval, "domains": dm.num_eval}
    eval_source = cfg.eval_source or (cfg.source if cfg.source in BUILTIN_SOURCES else None)
    splits = {"train": ("data.source", *split_records(cfg, cfg.source, "data.source", "train", seed, cache_dir))}
    if eval_source is not None and builtin_eval.get(eval_source, 1) > 0:
        splits["eval"] = ("data.eval_source",
                          *split_records(cfg, eval_source, "data.eval_source", "eval", seed, cache_dir))

    # Domain ids from the names of both splits together, so that an id means the same domain in each.
    domain_field = cfg.domain_field or ("domain" if "domains" in (cfg.source, cfg.eval_source) else None)
    doc_domains: Dict[str, Optional[np.ndarray]] = {split: None for split in splits}
    names = None
    if domain_field is not None:
        labels = {split: domain_labels(ds, domain_field, key, origin)
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
        passkey_eval = passkey_eval_set(cfg, tok, seed, cfg.seq_len, -(-pk.num_eval // pk.depths), pk.num_eval)
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


def passkey_eval_set(cfg: DataConfig, tokenizer, seed: int, num_tokens: int, samples: int,
                     limit: Optional[int] = None) -> PasskeyEval:
    """Passkey rows of ``num_tokens`` tokens: ``samples`` keys at each of ``data.passkey.depths`` depths
    (0 to 100%), the first ``limit`` of them (depth-interleaved, so any prefix spans the depths)."""
    pk = cfg.passkey
    depths = np.linspace(0.0, 1.0, pk.depths) if pk.depths > 1 else np.asarray([0.5])
    records = needle_records(depths.tolist(), samples, num_tokens, tokenizer, seed, pk.digits, cfg.add_bos,
                             cfg.add_eos, pk.key_order)
    order = np.arange(len(records)).reshape(len(depths), samples).T.reshape(-1)  # sample-major: depths interleave
    records = [records[i] for i in order[:limit]]
    return PasskeyEval.from_records(records, tokenizer, num_tokens, cfg.add_bos, cfg.add_eos)
