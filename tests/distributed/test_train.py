"""End-to-end trainer tests on CPU: loss equivalence across layouts, resume, recipes, CLI errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from longtrain.config import Config
from longtrain.train import RECIPES_DIR
from support.helpers import SMALL, FakeWandb, cli, compose_cfg, read_metrics, train_in_process, train_torchrun
from support.parity import assert_same_curve


@pytest.mark.parity
def test_accumulation_does_not_change_the_step(tmp_path):
    # One process, the same global batch of 4 sequences split 4x1, 2x2 and 1x4. fp32 on CPU: only the
    # summation order differs (tolerances: support/parity.py).
    a = train_in_process(tmp_path, "a", ["data.micro_batch_size=4", "trainer.grad_accum=1"])
    b = train_in_process(tmp_path, "b", ["data.micro_batch_size=2", "trainer.grad_accum=2"])
    c = train_in_process(tmp_path, "c", ["data.micro_batch_size=1", "trainer.grad_accum=4"])
    assert_same_curve(a, b)
    assert_same_curve(a, c)
    assert a[0]["loss"] != a[-1]["loss"]  # it trains


@pytest.mark.parity
def test_two_processes_match_one(tmp_path):
    # gloo, 2 ranks x 2 accumulation steps vs 1 rank x 4: the global-count loss makes them the same
    # optimisation problem; tolerance as above (fp32 reordering only).
    one = train_in_process(tmp_path, "one", ["data.micro_batch_size=1", "trainer.grad_accum=4"])
    two = train_torchrun(tmp_path, "two", 2, ["data.micro_batch_size=1", "trainer.grad_accum=2"])
    assert_same_curve(one, two)
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]


def test_resume_is_exact(tmp_path):
    full = train_in_process(tmp_path, "full", ["trainer.max_steps=6", "data.micro_batch_size=2",
                                               "trainer.grad_accum=2"])
    part = ["trainer.max_steps=6", "data.micro_batch_size=2", "trainer.grad_accum=2"]
    first = train_in_process(tmp_path, "split", part + ["trainer.stop_at_step=3"])
    assert [m["step"] for m in first] == [1, 2, 3]
    resumed = train_in_process(tmp_path, "split", part + ["checkpoint.resume=auto"])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    # Same process, same state restored, same op order: bitwise equal in practice; 1e-12 states intent.
    assert_same_curve(full, resumed, 1e-12)


def test_resume_on_another_world_size(tmp_path):
    # Stop a 2-rank run at step 2, resume it in one process: steps 3-4 match an uninterrupted
    # single-process run (fp32 reordering tolerance as above).
    ref = train_in_process(tmp_path, "ref", ["data.micro_batch_size=1", "trainer.grad_accum=4"])
    train_torchrun(tmp_path, "moved", 2, ["data.micro_batch_size=1", "trainer.grad_accum=2",
                                          "trainer.stop_at_step=2"])
    resumed = train_in_process(tmp_path, "moved", ["data.micro_batch_size=2", "trainer.grad_accum=2"])
    assert_same_curve(ref[2:], resumed[2:])


def test_run_directory_contents(tmp_path, monkeypatch):
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = train_in_process(tmp_path, "r", ["trainer.eval_every=2", "trainer.max_steps=2",
                                               "logging.wandb.mode=offline"])
    required = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_gib"}
    assert required <= set(metrics[0])
    assert "eval_loss" in metrics[-1] and "passkey_acc" in metrics[-1]
    assert 0.0 <= metrics[-1]["passkey_digit_acc"] <= 1.0
    assert any(k.startswith("passkey_acc_depth_") for k in metrics[-1])
    run_dir = tmp_path / "r"
    assert {"loss.png", "passkey.png", "throughput.png"} <= {p.name for p in (run_dir / "plots").iterdir()}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert OmegaConf.load(run_dir / "config.yaml").trainer.max_steps == 2
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run directory"
    assert {"command.txt", "environ.txt", "packages.txt", "versions.json"} <= {p.name for p in (run_dir / "env").iterdir()}


def test_wandb_gets_the_resolved_config_and_a_restart_resumes_its_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    common = ["trainer.max_steps=2", "logging.wandb.mode=offline", "logging.wandb.project=lt",
              "logging.wandb.group=g1", "logging.wandb.tags=[sp,tiny]", "run.name=seq${data.seq_len}"]
    train_in_process(tmp_path, "w", common + ["trainer.stop_at_step=1"])
    metrics = train_in_process(tmp_path, "w", common)  # the restarted job: resumes step 1
    assert [m["step"] for m in metrics] == [1, 2]
    first, second = fake.inits
    assert first["id"] == second["id"] and first["resume"] == second["resume"] == "allow"
    assert (first["project"], first["group"], first["tags"], first["name"]) == ("lt", "g1", ["sp", "tiny"], "seq256")
    config = first["config"]  # the typed config as plain values: interpolations resolved
    assert "${" not in json.dumps(config)
    assert config["run"]["name"] == "seq256" and config["run"]["dir"] == str(tmp_path / "w")
    assert config["data"]["seq_len"] == 256 and config["trainer"]["stop_at_step"] == 1
    assert second["config"]["trainer"]["stop_at_step"] == 0
    metric_logs = [(step, data) for step, data in fake.logged if not any(k.startswith("plots/") for k in data)]
    assert [step for step, _ in metric_logs] == [1, 2]
    assert all("/" in name for _, data in fake.logged for name in data)  # every W&B name is grouped
    # Each attempt ends by sending its plots as images, at its last step.
    images = [(step, sorted(data)) for step, data in fake.logged if (step, data) not in metric_logs]
    assert images == [(1, ["plots/loss"]), (1, ["plots/throughput"]), (2, ["plots/loss"]), (2, ["plots/throughput"])]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in Path(RECIPES_DIR).glob("*.yaml")))
def test_every_recipe_composes_and_validates(recipe):
    cfg = compose_cfg([], recipe=recipe)
    assert isinstance(cfg, Config) and cfg.trainer.max_steps >= 1
    head = (Path(RECIPES_DIR) / f"{recipe}.yaml").read_text().splitlines()[:3]
    assert any("launch/run.sh" in line and f"--recipe {recipe}" in line for line in head), \
        "every recipe starts with its exact launch command"
    hydra_cfg = OmegaConf.to_container(OmegaConf.load(Path(RECIPES_DIR) / f"{recipe}.yaml").hydra)  # unresolved
    assert hydra_cfg["sweep"]["dir"].startswith("${run.dir}") and hydra_cfg["sweep"]["subdir"] == "${hydra.job.num}", \
        "--multirun gives each job its own run directory"


def test_multirun_sweep_gives_each_job_its_own_run(tmp_path):
    # Two jobs, one after the other, each in <run.dir>-<time>/<job number> with its own name.
    proc = cli("--multirun", "optim.lr=1e-3,4e-3", f"run.dir={tmp_path / 'lr'}", f"data.cache_dir={tmp_path / 'cache'}",
               *SMALL, "trainer.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = tmp_path.glob("lr-*")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    lrs = []
    for num in (0, 1):
        run_dir = sweep / str(num)
        assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
        cfg = OmegaConf.load(run_dir / "config.yaml")
        assert cfg.run.dir == str(run_dir) and cfg.run.name == f"{sweep.name}-{num}"
        assert cfg.logging.wandb.group == sweep.name
        assert (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "env" / "command.txt").is_file()
        lrs.append(read_metrics(run_dir)[-1]["lr"])
    assert lrs[1] == pytest.approx(4 * lrs[0])


def write_bad_inputs(tmp):
    """Malformed inputs for the bad-input cases, under ``tmp``."""
    (tmp / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n')
    (tmp / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    (tmp / "corpus.csv").write_text("text\nhello\n")
    (tmp / "tok_empty").mkdir()
    (tmp / "tok_corrupt").mkdir()
    (tmp / "tok_corrupt" / "tokenizer.json").write_text("{not json")
    (tmp / "a_file").write_text("x")


# Each case: the arguments ({tmp} is the test's directory holding write_bad_inputs' files; VAR=value
# words set the environment) and the text its one error line must contain.
@pytest.mark.parametrize("args, expected", [
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("data.mode=chat", "data.mode"),
    ("trainer.bogus=1", "trainer.bogus"),
    ("model.name=gpt9", "model.name"),
    ("data.source=/nonexistent/corpus.jsonl", "data.source"),
    ("data.tokenizer=/nonexistent/tok", "data.tokenizer"),
    ("data.global_batch_size=3", "data.global_batch_size"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("+trainer.foo=1", "trainer.foo"),
    ("parallel.sp.ulysses_chunks=-1", "parallel.sp.ulysses_chunks"),
    ("--config-name=nope", "unknown recipe 'nope'"),
    # malformed data and tokenizer files
    ("data.source={tmp}/bad.jsonl", "data.source: line 3 of '{tmp}/bad.jsonl' is not valid JSON"),
    ("data.source={tmp}/list.jsonl", "data.source: line 2 of '{tmp}/list.jsonl' is not a JSON object"),
    ("data.eval_source={tmp}/corpus.csv", "data.eval_source: unsupported extension '.csv'"),
    ("data.tokenizer={tmp}/tok_empty", "data.tokenizer: '{tmp}/tok_empty' holds no tokenizer files"),
    ("data.tokenizer={tmp}/tok_corrupt", "data.tokenizer: cannot load a tokenizer from '{tmp}/tok_corrupt'"),
    ("run.dir={tmp}/a_file", "run.dir: '{tmp}/a_file' exists and is not a directory"),
    # layouts checked against torchrun's world size, and every job of a sweep
    ("WORLD_SIZE=2 parallel.sp.ulysses=3", "parallel.sp.ulysses x parallel.sp.ring = 3 x 1 = 3 does not divide "
                                           "the world size 2"),
    ("--multirun optim.lr=1e-3,-1", "optim.lr: must be positive, got -1.0"),
    ("--multirun optim.lr=interval(0,1)", "optim.lr: interval() sweeps need a sweeper plugin"),
    # zero and negative values
    ("model.num_layers=0", "model.num_layers: must be a positive integer, got 0"),
    ("optim.beta2=1.0", "optim.beta2: must be in [0, 1), got 1.0"),
    ("parallel.timeout_s=0", "parallel.timeout_s: must be at least 1 second, got 0"),
    ("logging.peak_tflops=-1", "logging.peak_tflops: must be null (detect) or positive, got -1.0"),
    ("trainer.seed=-1", "trainer.seed: must be >= 0, got -1"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, expected):
    write_bad_inputs(tmp_path)
    words = args.format(tmp=tmp_path).split()
    env = dict(w.split("=", 1) for w in words if w.split("=")[0].isupper())
    words = [w for w in words if not w.split("=")[0].isupper()]
    if not any(w.startswith("run.dir=") for w in words):
        words.append(f"run.dir={tmp_path / 'run'}")
    proc = cli(*words, f"data.cache_dir={tmp_path / 'cache'}", "logging.progress=false", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("longtrain: error: ") and expected.format(tmp=tmp_path) in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_resuming_another_models_checkpoint_is_one_clear_error(tmp_path):
    train_in_process(tmp_path, "small", ["trainer.max_steps=1"])
    proc = cli(*SMALL, "model.hidden_size=96", f"checkpoint.resume={tmp_path / 'small'}",
               f"run.dir={tmp_path / 'big'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"longtrain: error: checkpoint.resume: {tmp_path}/small/checkpoints/step_00000001 holds a "
                    "different model (differs in head_dim, hidden_size: checkpoint vs this run head_dim 16 vs 24, "
                    "hidden_size 64 vs 96); resume with the same model.* settings or start fresh with "
                    "checkpoint.resume=none or another run.dir")
