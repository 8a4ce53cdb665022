"""The needle-in-a-haystack grid, the run's plots and ``longtrain-eval``: a 4-step run of the small
recipe that evaluates at 1x and 2x its length, then the evaluation CLI on its checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from longtrain.eval.cli import main
from longtrain.trainer.metrics import format_needle
from longtrain.trainer.needle import grid_table
from longtrain.trainer.plots import PLOT_NAMES, plot_needle
from support.helpers import REPO, train_in_process

GRID = ["trainer.eval_every=2", "data.passkey.grid_lengths=[1,2]", "data.passkey.grid_samples=2",
        "data.passkey.depths=3", "data.passkey.num_eval=6"]


def test_grid_table_and_its_picture(tmp_path):
    rows_1x = [(True, 1.0, 0.0), (False, 0.5, 0.0), (True, 1.0, 1.0), (True, 1.0, 1.0)]
    rows_2x = [(False, 0.25, 0.0), (False, 0.0, 0.0), (True, 1.0, 1.0), (False, 0.75, 1.0)]
    grid = grid_table([(1, 64, rows_1x), (2, 128, rows_2x)], samples=2)
    assert grid["lengths"] == [64, 128] and grid["multiples"] == [1, 2] and grid["depths"] == [0.0, 1.0]
    assert grid["acc"] == [[0.5, 0.0], [1.0, 0.5]] and grid["overall"] == [0.75, 0.25]
    assert grid["digit_acc"][0] == [0.75, 0.125]
    table = format_needle(grid).splitlines()
    assert table[1].split() == ["depth", "64", "(1x)", "128", "(2x)"] and table[2].split() == ["0%", "0.50", "0.00"]
    png = plot_needle(grid, tmp_path / "needle.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("needle")
    metrics = train_in_process(tmp, "run", GRID)
    assert "passkey_acc" in metrics[-1] and "passkey_acc_depth_0-20" in metrics[-1]
    return tmp / "run"


def test_run_ends_with_the_grid_and_the_plots(run_dir):
    grid = json.loads((run_dir / "needle.json").read_text())
    assert grid["step"] == 4 and grid["lengths"] == [256, 512] and grid["depths"] == [0.0, 0.5, 1.0]
    assert all(len(row) == 2 and all(0.0 <= v <= 1.0 for v in row) for row in grid["acc"])
    assert {f"{name}.png" for name in PLOT_NAMES} == {p.name for p in (run_dir / "plots").iterdir()}


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "longtrain.eval", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_eval_cli_on_a_checkpoint_at_twice_the_length(run_dir, tmp_path):
    text = tmp_path / "ppl.jsonl"
    text.write_text("".join(json.dumps({"text": f"Sala mepu {i} kite. " * 20}) + "\n" for i in range(4)))
    proc = _eval("--checkpoint", str(run_dir), "data.passkey.grid_lengths=[2]", "data.passkey.depths=2",
                 "--jsonl", str(text), "--json", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["needle"]["lengths"] == [512] and out["needle"]["depths"] == [0.0, 1.0]
    assert out["perplexity"]["tokens"] > 0 and 1.0 < out["perplexity"]["perplexity"] < 300
    assert (tmp_path / "out" / "plots" / "needle.png").is_file() and (tmp_path / "out" / "needle.json").is_file()
    # YaRN at evaluation time (not trained with it): the grid still runs, with the scaled RoPE.
    proc = _eval("--checkpoint", str(run_dir), "data.passkey.grid_lengths=[2]", "data.passkey.depths=1",
                 "+model.rope_scaling={rope_type:yarn,factor:2,original_max_position_embeddings:256}")
    assert proc.returncode == 0 and "512 (2x)" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("args, line", [
    ((), "give exactly one of --checkpoint and --hf"),
    (("--checkpoint", "/nonexistent/run"), "--checkpoint: '/nonexistent/run' does not exist"),
    (("--hf", "/nonexistent/hf"), "model.hf_path: no config.json in '/nonexistent/hf'"),
    (("--checkpoint", "RUN", "data.passkey.grid_lengths=[0]"), "data.passkey.grid_lengths: must be whole multiples"),
    (("--checkpoint", "RUN", "data.passkey.nope=1"), "data.passkey.nope"),
    (("--checkpoint", "RUN", "--jsonl", "/nonexistent.jsonl"), "--jsonl: '/nonexistent.jsonl' does not exist"),
    (("--checkpoint", "RUN", "--frobnicate"), "--frobnicate: not a flag of longtrain-eval"),
    (("--checkpoint", "RUN", "--out", "/sys/longtrain-eval"), "--out: cannot"),  # sysfs refuses mkdir
])
def test_eval_cli_errors_are_one_line(run_dir, args, line, capsys):
    assert main([str(run_dir) if a == "RUN" else a for a in args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("longtrain: error: ") and line in last, last


def test_init_from_starts_a_longer_run_from_a_checkpoints_weights(run_dir, tmp_path):
    """model.init_from: the weights of the run's checkpoint (a fresh optimizer and step count), at twice
    the length with YaRN; the geometry is checked before any work."""
    from safetensors.torch import load_file

    from longtrain.precheck import precheck
    from longtrain.trainer.build import build_model, build_model_args
    from longtrain.trainer.init_from import find_checkpoint
    from support.helpers import SMALL, compose_cfg

    yarn = "+model.rope_scaling={rope_type:yarn,factor:2,original_max_position_embeddings:256}"
    cfg = compose_cfg(SMALL + [f"model.init_from={run_dir}", yarn, "data.seq_len=512"])
    model = build_model(build_model_args(cfg.model), None, 123, torch.device("cpu"), cfg.model.init_from)
    saved = load_file(str(find_checkpoint(str(run_dir), "model.init_from") / "model.safetensors"))
    assert saved and all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model.args.rope_scaling["rope_type"] == "yarn"
    metrics = train_in_process(tmp_path, "ext", [f"model.init_from={run_dir}", yarn, "data.seq_len=512",
                                                 "trainer.max_steps=1", "trainer.eval_every=0"])
    assert metrics[-1]["step"] == 1
    problem = precheck(SMALL + [f"run.dir={tmp_path / 'x'}", f"model.init_from={run_dir}", "model.num_layers=3"], 1)
    assert problem.startswith("model.init_from: the checkpoint") and "num_layers: 2 there, 3 here" in problem
    problem = precheck(SMALL + [f"run.dir={tmp_path / 'x'}", f"model.init_from={tmp_path / 'nothing'}"], 1)
    assert problem.startswith("model.init_from:") and "does not exist" in problem
