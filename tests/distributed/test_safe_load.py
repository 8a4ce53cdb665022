"""Checkpoints are loaded as data, never as code (longtrain/trainer/state_files.py, longtrain/io.py).

Every state file longtrain writes loads with ``torch.load(weights_only=True)``; RNG files of earlier
versions (numpy's state as an array) still load; ``model.init_from`` and ``longtrain-eval
--checkpoint`` read a plain checkpoint's weights and configs only, never a pickle; a ZeRO checkpoint
whose shards would run code is refused before DeepSpeed unpickles them. (A resume refusing each kind
of planted state file, plain and ZeRO: tests/distributed/test_errors.py's ``ck-code-*`` cases.)
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from longtrain.config import ConfigError
from longtrain.eval.cli import main as eval_main
from longtrain.io import UnsafeStateFile, load_rng_state, load_torch, rng_state, save_torch, set_rng_state
from longtrain.precheck import precheck
from longtrain.trainer import state_files
from longtrain.trainer.build import build_model, build_model_args
from support.helpers import SMALL, compose_cfg, train_in_process
from support.planted import plant

REPO = Path(__file__).resolve().parents[2]
MARKER = "PLANTED_CODE_RAN"


def test_no_load_in_longtrain_unpickles_code():
    """``weights_only=False`` appears nowhere in longtrain/, and torch.load is called in io.py only."""
    offenders = []
    for path in sorted((REPO / "longtrain").rglob("*.py")):
        text = path.read_text()
        if "weights_only=False" in text or (re.search(r"\btorch\.load\(", text) and path.name != "io.py"):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def _draws():
    return random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist()


def test_rng_state_is_plain_data_and_old_rng_files_still_load(tmp_path):
    save_torch(rng_state(), tmp_path / "new.pt")
    want = _draws()
    set_rng_state(torch.load(tmp_path / "new.pt", weights_only=True))  # no allow-list needed
    assert _draws() == want
    # an earlier version's file: python's state as a tuple, numpy's as (name, array, ...)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    want = _draws()
    with pytest.raises(UnsafeStateFile, match="numpy"):
        load_torch(tmp_path / "old.pt")  # numpy's array type only where RNG files are read
    set_rng_state(load_rng_state(tmp_path / "old.pt"))
    assert _draws() == want


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A 2-step plain run whose checkpoint has a payload in every state file (and a balancer file)."""
    tmp = tmp_path_factory.mktemp("planted")
    train_in_process(tmp, "run", ["trainer.max_steps=2", "checkpoint.every=2"])
    checkpoint = tmp / "run" / "checkpoints" / "step_00000002"
    for rel in ("optimizer.pt", "scheduler.pt", "rng/rank_00000.pt", "moe_balance.pt"):
        plant(checkpoint, rel, tmp / MARKER)
    return tmp


def test_init_from_and_eval_read_weights_and_configs_only(planted_run, monkeypatch, capsys):
    """With torch.load made to fail, init_from and longtrain-eval still load the planted plain
    checkpoint (safetensors and JSON only), and the payloads never run; resuming it is refused."""
    tmp = planted_run
    run_dir = tmp / "run"

    def no_pickles(*args, **kwargs):
        raise AssertionError(f"torch.load{args} called")

    monkeypatch.setattr(torch, "load", no_pickles)
    cfg = compose_cfg(SMALL + [f"model.init_from={run_dir}"])
    model = build_model(build_model_args(cfg.model), None, 0, torch.device("cpu"), cfg.model.init_from)
    assert model.args.num_layers == 2
    assert precheck(SMALL + [f"run.dir={tmp / 'x'}", f"model.init_from={run_dir}"], 1) is None
    assert eval_main(["--checkpoint", str(run_dir), "data.passkey.grid_lengths=[1]", "data.passkey.depths=1",
                      "data.passkey.grid_samples=1", "--json"]) == 0, capsys.readouterr().err[-2000:]
    monkeypatch.undo()
    assert not (tmp / MARKER).exists()
    problems = state_files.unsafe(run_dir / "checkpoints" / "step_00000002",
                                  state_files.pickles(run_dir / "checkpoints" / "step_00000002"))
    assert len(problems) == 4 and all("posix.system" in p for p in problems)
    assert not (tmp / MARKER).exists()


def test_a_zero_checkpoint_with_code_is_refused_by_init_from_and_eval(tmp_path, capsys):
    """ZeRO weights come from DeepSpeed's shards, which DeepSpeed unpickles: a payload there is refused
    by precheck, the model builder and longtrain-eval, naming the file, before any of it is loaded;
    the same checkpoint without the payload starts a run."""
    train_in_process(tmp_path, "z", ["trainer.max_steps=1", "checkpoint.every=1", "zero.stage=2"])
    run_dir = tmp_path / "z"
    cfg = compose_cfg(SMALL + [f"model.init_from={run_dir}"])
    clean = build_model(build_model_args(cfg.model), None, 0, torch.device("cpu"), cfg.model.init_from)
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    shard = plant(checkpoint, "zero/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / MARKER)
    said = f"model.init_from: '{shard}' holds the global posix.system"
    assert precheck(SMALL + [f"run.dir={tmp_path / 'x'}", f"model.init_from={run_dir}"], 1).startswith(said)
    with pytest.raises(ConfigError, match=re.escape(said)):
        build_model(build_model_args(cfg.model), None, 0, torch.device("cpu"), cfg.model.init_from)
    assert eval_main(["--checkpoint", str(run_dir), "--json"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"longtrain: error: --checkpoint: '{shard}'")
    assert not (tmp_path / MARKER).exists() and clean.args.num_layers == 2
