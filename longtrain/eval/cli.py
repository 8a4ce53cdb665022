"""``longtrain-eval`` / ``python -m longtrain.eval``: evaluate a checkpoint or a Hugging Face directory.

    longtrain-eval (--checkpoint PATH | --hf DIR) [--config-name RECIPE] [--config-dir DIR] [key=value ...]
                   [--jsonl FILE] [--out DIR] [--json]

- ``--checkpoint``: a checkpoint directory, a run's ``checkpoints/`` folder or a run directory (its
  newest complete checkpoint); the config is the run's ``config.yaml`` unless ``--config-name`` is given.
- ``--hf``: a local Hugging Face model directory (geometry and weights); the config is the recipe's
  (``tiny`` by default: byte tokenizer; give ``data.tokenizer=DIR`` for the model's own).
- ``key=value``: config overrides, e.g. ``data.passkey.grid_lengths=[1,2,4,8]``,
  ``data.passkey.grid_samples=8`` or RoPE scaling for lengths beyond training,
  ``+model.rope_scaling={rope_type:yarn,factor:4,original_max_position_embeddings:2048}``.

It reports the needle-in-a-haystack grid (passkey accuracy by depth at each multiple of
``data.seq_len`` in ``data.passkey.grid_lengths``) and, with ``--jsonl``, the perplexity of a local
file's records (packed into ``data.seq_len`` rows as in training; every token of ``data.text_field`` is
scored, or the responses of chat and prompt/response records).
``--out`` writes ``needle.json``, ``eval.json`` and ``plots/needle.png`` there. One process, on
``trainer.device``. Bad input ends in one ``longtrain: error: ...`` line and exit code 2, as in training.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from longtrain.config import Config, ConfigError, register_configs
from longtrain.errors import FULL_ERROR_ENV, error_boundary
from longtrain.io import atomic_write_text
from longtrain.models import Transformer, from_hf
from longtrain.models.args import ModelArgs
from longtrain.optim.loss import IGNORE_INDEX, chunked_lm_loss
from longtrain.precheck import compose_config, compose_saved_config, precheck, writable_dir_problem
from longtrain.trainer.data import cache_root, collate, load_records, load_tokenizer, pack_cached, tokenize
from longtrain.trainer.init_from import check_loadable, find_checkpoint, load_weights, saved_model_args
from longtrain.trainer.metrics import format_needle
from longtrain.trainer.needle import answer_hits, needle_grid, score_passkey
from longtrain.trainer.plots import plot_needle

USAGE = ("longtrain-eval (--checkpoint PATH | --hf DIR) [--config-name RECIPE] [--config-dir DIR] [key=value ...] "
         "[--jsonl FILE] [--out DIR] [--json]")
_FLAGS = ("--checkpoint", "--hf", "--jsonl", "--out")


def parse_args(argv: List[str]) -> Tuple[Dict, List[str]]:
    """(this command's own flags, the config part of the command line: --config-name/--config-dir and overrides)."""
    own: Dict = {"checkpoint": None, "hf": None, "jsonl": None, "out": None, "json": False}
    rest, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in _FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise ConfigError(f"{flag}: needs a path ({USAGE})")
                value = argv[i]
            own[flag[2:]] = value
        elif argv[i] == "--json":
            own["json"] = True
        elif argv[i].startswith("-") and flag not in ("--config-name", "-cn", "--config-dir", "-cd"):
            raise ConfigError(f"{argv[i]}: not a flag of longtrain-eval ({USAGE})")
        else:
            rest.append(argv[i])
        i += 1
    if (own["checkpoint"] is None) == (own["hf"] is None):
        raise ConfigError(f"give exactly one of --checkpoint and --hf ({USAGE})")
    return own, rest


def run_config(checkpoint: Path, overrides: List[str]) -> Config:
    """The config of the run ``checkpoint`` belongs to (its ``config.yaml``) with ``overrides`` applied."""
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--checkpoint: no config.yaml in the run directory '{run_dir}'; give the recipe with "
                          "--config-name (and its overrides)")
    return compose_saved_config(run_dir / "config.yaml", overrides)


def load_checkpoint_model(checkpoint: Path, cfg: Config) -> Transformer:
    """The model of a checkpoint (its saved geometry; ``model.rope_scaling`` from the config when set)."""
    args = ModelArgs(**saved_model_args(checkpoint))
    if cfg.model.rope_scaling:
        args = dataclasses.replace(args, rope_scaling=cfg.model.rope_scaling)
    model = Transformer(args)
    load_weights(model, checkpoint, "--checkpoint")
    return model


def load_hf_model(path: str, cfg: Config) -> Transformer:
    """The model of a Hugging Face directory (``model.rope_scaling`` from the config when set)."""
    model = from_hf(path)
    if cfg.model.rope_scaling:
        model.args = dataclasses.replace(model.args, rope_scaling=cfg.model.rope_scaling)
        model.reset_rope()
    return model


@torch.no_grad()
def evaluate_needles(model: Transformer, cfg: Config, tokenizer, device: torch.device) -> Dict:
    """The needle grid of ``cfg.data.passkey`` (lengths x depths) for ``model``, in one process."""
    def hits(full, answer_mask):
        batch = {k: v.to(device) for k, v in full.items()}
        mask = answer_mask.to(device)
        hidden = lambda head: head(model.hidden_states(batch["input_ids"], batch["position_ids"], batch["doc_ids"]),
                                   model.output_weight)
        return answer_hits(hidden, batch["labels"], mask), mask

    return needle_grid(cfg.data, tokenizer, cfg.trainer.seed, model,
                       lambda rows: score_passkey(rows, np.arange(rows.num_rows), cfg.data.micro_batch_size, hits))


@torch.no_grad()
def perplexity(model: Transformer, cfg: Config, tokenizer, path: str, device: torch.device) -> Dict:
    """Token-level perplexity of the records of the local file ``path``, packed into ``data.seq_len`` rows."""
    dc = cfg.data
    cache = cache_root(dc)
    records = load_records(path, "--jsonl", os.path.join(cache, "datasets"))
    # Text records are scored on every token; chats and prompt/response records on their responses.
    mode = "pretrain" if dc.text_field in records.column_names else "sft"
    tokenized = tokenize(records, tokenizer, mode, dc.text_field, dc.add_bos, dc.add_eos, cache, "--jsonl", repr(path))
    packed = pack_cached(tokenized, dc.seq_len, dc.overlong, tokenizer.pad_id, cache, "--jsonl")
    total, count = 0.0, 0
    for start in range(0, packed.num_rows, dc.micro_batch_size):
        batch = {k: v.to(device) for k, v in collate(packed, np.arange(start, min(start + dc.micro_batch_size,
                                                                                   packed.num_rows))).items()}
        hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
        total += float(chunked_lm_loss(hidden, model.output_weight, batch["labels"], None,
                                       chunk_size=cfg.trainer.loss_chunk_size))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"file": path, "tokens": count, "rows": packed.num_rows, "loss": loss, "perplexity": math.exp(loss)}


def eval_main(argv: List[str]) -> int:
    """Run the command line ``argv``; returns the exit code."""
    own, rest = parse_args(argv)
    if own["out"]:  # checked before the evaluation's work, as training checks run.dir
        problem = writable_dir_problem("--out", own["out"])
        if problem is not None:
            raise ConfigError(problem)
    checkpoint = find_checkpoint(own["checkpoint"], "--checkpoint") if own["checkpoint"] else None
    if checkpoint is not None:
        check_loadable(checkpoint, "--checkpoint")
    named = any(a.split("=")[0] in ("--config-name", "-cn", "--config-dir", "-cd") for a in rest)
    if checkpoint is not None and not named:
        cfg = run_config(checkpoint, rest)
    else:
        error = precheck(rest, world_size=1)
        if error is not None:
            raise ConfigError(error)
        cfg = compose_config(rest)
    device = torch.device("cuda" if cfg.trainer.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model = load_checkpoint_model(checkpoint, cfg) if checkpoint is not None else load_hf_model(own["hf"], cfg)
    model.to(device).eval()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ConfigError(f"data.tokenizer: its vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                          f"({model.args.vocab_size}); give the model's own tokenizer")
    out: Dict = {"model": str(checkpoint or own["hf"]), "seq_len": cfg.data.seq_len}
    if cfg.data.passkey.grid_lengths:
        out["needle"] = evaluate_needles(model, cfg, tokenizer, device)
    if own["jsonl"]:
        out["perplexity"] = perplexity(model, cfg, tokenizer, own["jsonl"], device)
    if own["out"]:
        _write(Path(own["out"]), out)
    if own["json"]:
        print(json.dumps(out))
    else:
        if "needle" in out:
            print(format_needle(out["needle"]))
        if "perplexity" in out:
            p = out["perplexity"]
            print(f"perplexity of {p['file']}: {p['perplexity']:.4g} (loss {p['loss']:.4f} over {p['tokens']} tokens)")
    return 0


def _write(out_dir: Path, out: Dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "eval.json", json.dumps(out, indent=1) + "\n")
    if "needle" in out:
        atomic_write_text(out_dir / "needle.json", json.dumps(out["needle"], indent=1) + "\n")
        (out_dir / "plots").mkdir(exist_ok=True)
        plot_needle(out["needle"], out_dir / "plots" / "needle.png")


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point (``longtrain-eval``): one ``longtrain: error:`` line and exit 2 on bad input."""
    register_configs()
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(FULL_ERROR_ENV) == "1":
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    logger = logging.getLogger("longtrain")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the results are the output, not the start-up lines
    try:
        with error_boundary():
            return eval_main(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        logger.setLevel(level)
