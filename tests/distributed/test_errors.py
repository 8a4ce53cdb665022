"""Every malformed input ends in one ``longtrain: error:`` line naming the key or file, with exit code
2 and no traceback, before any training work; a refused start leaves no run directory behind.

The table cases run the CLI in this process (:func:`longtrain.train.cli_main`); a few run real
processes: the launcher (``launch/run.sh``, torchrun with 2 ranks), the console entry and, where
permissions matter, the CLI as an unprivileged user.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from longtrain.train import cli_main
from support.planted import plant

REPO = Path(__file__).resolve().parents[2]

MODEL = ["model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2"]
REST = ["data.seq_len=256", "data.mode=pretrain", "data.global_batch_size=4", "data.passkey.num_train=24",
        "data.passkey.num_eval=2",
        "data.passkey.min_chars=60", "data.passkey.max_chars=150", "trainer.eval_every=0", "trainer.max_steps=2",
        "optim.warmup_steps=1", "logging.progress=false", "trainer.device=cpu"]


def run_cli(argv, env=None):
    """(exit code, stderr) of the CLI run in this process."""
    err = io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stderr(err):
            code = cli_main(list(argv))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, err.getvalue()


def assert_one_error(code, stderr, expected, want_code=2):
    assert code == want_code, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert lines, "no error line"
    last = lines[-1]
    assert last.startswith("longtrain: error: "), stderr[-2000:]
    for text in expected:
        assert text in last, (text, last)
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr[-2000:]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("trained")
    code, err = run_cli([*MODEL, *REST, f"run.dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                         "checkpoint.every=1"])
    assert code == 0, err[-3000:]
    return root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A valid Hugging Face directory of a small Llama."""
    from longtrain.models import ModelArgs, Transformer, to_hf

    path = tmp_path_factory.mktemp("hf") / "model"
    args = ModelArgs(vocab_size=384, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                     num_kv_heads=2, tie_embeddings=True)
    to_hf(Transformer(args), path)
    return path


@pytest.fixture(scope="module")
def trained_zero(tmp_path_factory):
    """The same 2-step run under ZeRO-2 (one process): DeepSpeed's shards under ``zero/``."""
    root = tmp_path_factory.mktemp("trained_zero")
    code, err = run_cli([*MODEL, *REST, f"run.dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                         "checkpoint.every=1", "zero.stage=2"])
    assert code == 0, err[-3000:]
    return root


def write_inputs(tmp: Path) -> None:
    """Malformed data, tokenizer and config files under ``tmp``."""
    (tmp / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n')
    (tmp / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    (tmp / "corpus.csv").write_text("text\nhello\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.txt").write_text("  \n\n")
    (tmp / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (tmp / "notext.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    (tmp / "torn.json").write_text('[{"text": "a"}, {"text": ')
    (tmp / "nofiles").mkdir()
    (tmp / "nofiles" / "readme.md").write_text("x")
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp / "mixed" / "b.txt").write_text("b")
    (tmp / "tok_empty").mkdir()
    (tmp / "tok_corrupt").mkdir()
    (tmp / "tok_corrupt" / "tokenizer.json").write_text("{not json")
    (tmp / "a_file").write_text("x")
    (tmp / "recipes_empty").mkdir()


def copy_run(trained: Path, tmp: Path) -> Path:
    dst = tmp / "ckrun"
    shutil.copytree(trained / "run", dst)
    return dst


def truncate(path: Path, keep: int = 10) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


STEP1, STEP2 = "checkpoints/step_00000001", "checkpoints/step_00000002"


PLANTED = {  # kind -> the state file of the newest checkpoint that gets a payload (support/planted.py)
    "ck_code_optimizer": "optimizer.pt", "ck_code_scheduler": "scheduler.pt", "ck_code_rng": "rng/rank_00000.pt",
    "ck_code_balancer": "moe_balance.pt",
    "ckz_code_model_states": "zero/state/mp_rank_00_model_states.pt",
    "ckz_code_optim_states": "zero/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "ckz_code_scheduler": "scheduler.pt", "ckz_code_rng": "rng/rank_00000.pt",
    "ckz_code_extra": "zero/state/zero_pp_rank_1_mp_rank_00_optim_states.pt",  # a shard of a rank the run had not
}
MARKER = "PLANTED_CODE_RAN"


def prepare(kind: str, tmp: Path, trained: Path, hf: Path) -> dict:
    """Build the input a case needs; returns the names its arguments use (``trained`` is the ZeRO
    run for the ``ckz`` kinds)."""
    names = {"tmp": tmp}
    if kind.startswith("ck"):
        run = copy_run(trained, tmp)
        names["ck"] = run
        if kind in PLANTED:
            plant(run / STEP2, PLANTED[kind], tmp / MARKER)
        if kind == "ck_trunc2":
            truncate(run / STEP2 / "model.safetensors", 100)
        elif kind == "ck_manifest2":
            (run / STEP2 / "manifest.json").write_text('{"step": 2, "files": [')
        elif kind == "ck_trunc_both":
            truncate(run / STEP1 / "model.safetensors", 100)
            truncate(run / STEP2 / "model.safetensors", 100)
        elif kind == "ck_flip2":
            flip_byte(run / STEP2 / "model.safetensors")
    elif kind.startswith("hf"):
        dst = tmp / "hf"
        shutil.copytree(hf, dst)
        names["hf"] = dst
        cfg_file, weights = dst / "config.json", dst / "model.safetensors"
        if kind == "hf_torn_config":
            cfg_file.write_text('{"model_type": "llama", ,}')
        elif kind == "hf_list_config":
            cfg_file.write_text("[1, 2]")
        elif kind == "hf_no_config":
            cfg_file.unlink()
        elif kind == "hf_model_type":
            cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "gpt2"}))
        elif kind == "hf_missing_keys":
            cfg = json.loads(cfg_file.read_text())
            del cfg["hidden_size"]
            cfg_file.write_text(json.dumps(cfg))
        elif kind == "hf_no_weights":
            weights.unlink()
            (dst / "pytorch_model.bin").write_bytes(b"x")
        elif kind == "hf_trunc":
            weights.write_bytes(weights.read_bytes()[:-1000])
        elif kind == "hf_header":
            weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
        elif kind == "hf_index_missing":
            weights.unlink()
            (dst / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
        elif kind == "hf_index_torn":
            (dst / "model.safetensors.index.json").write_text('{"weight_map": {')
        elif kind == "hf_shape":
            cfg = json.loads(cfg_file.read_text())
            cfg["intermediate_size"] = 96
            cfg_file.write_text(json.dumps(cfg))
        elif kind == "hf_heads":
            cfg = json.loads(cfg_file.read_text())
            cfg["num_key_value_heads"] = 3
            cfg_file.write_text(json.dumps(cfg))
        elif kind == "hf_is_file":
            shutil.rmtree(dst)
            dst.write_text("x")
    return names


# Each case: id, the input to build (prepare()), the arguments ({tmp}: the case's directory with
# write_inputs' files, {ck}: a copy of the trained run, {hf}: a copy of the HF directory; VAR=value
# words set the environment; "nomodel" leaves out the small model's geometry), the texts the last
# line must contain.
CASES = [
    # ---------------------------------------------------------------- configs
    ("cfg-min-steps", "", "trainer.max_steps=0", ["trainer.max_steps: must be at least 1"]),
    ("cfg-choice", "", "data.mode=chat", ["data.mode: must be pretrain or sft"]),
    ("cfg-unknown-key", "", "trainer.bogus=1", ["trainer.bogus", "not a valid key"]),
    ("cfg-plus-unknown", "", "+trainer.foo=1", ["trainer.foo"]),
    ("cfg-unknown-model", "", "model.name=gpt9", ["model.name: unknown model 'gpt9'", "tiny"]),
    ("cfg-str-for-int", "", "trainer.max_steps=abc", ["trainer.max_steps: must be a whole number, got 'abc'",
                                                       "e.g. trainer.max_steps=100"]),
    ("cfg-float-for-int", "", "trainer.max_steps=1.5", ["trainer.max_steps: must be a whole number, got '1.5'"]),
    ("cfg-str-for-float", "", "optim.lr=fast", ["optim.lr: must be a number, got 'fast'"]),
    ("cfg-bad-bool", "", "logging.progress=maybe", ["logging.progress", "true or false"]),
    ("cfg-key-order", "", "data.passkey.key_order=shuffled", ["data.passkey.key_order: must be random or sorted"]),
    ("cfg-grid-lengths", "", "data.passkey.grid_lengths=[1,0.5]", ["data.passkey.grid_lengths"]),
    ("cfg-rope-type", "", "+model.rope_scaling={{rope_type:dynamic,factor:2}}",
     ["model.rope_scaling: rope_type 'dynamic' is not supported", "yarn"]),
    ("cfg-rope-key", "", "+model.rope_scaling={{rope_type:linear,factor:2,beta_fast:4}}",
     ["model.rope_scaling: beta_fast is not a key of linear scaling"]),
    ("cfg-unbalanced", "", "data.seq_len=[1024", ["data.seq_len: cannot parse the override 'data.seq_len=[1024'",
                                                   "brackets"]),
    ("cfg-no-equals", "", "trainer.max_steps", ["'trainer.max_steps': an override needs the form key=value"]),
    ("cfg-config-dir-missing", "", "--config-dir={tmp}/nope", ["--config-dir: '{tmp}/nope' is not a directory"]),
    ("cfg-config-dir-empty", "", "--config-dir={tmp}/recipes_empty", ["--config-dir", "holds no recipes"]),
    ("cfg-unknown-recipe", "", "--config-name=nope", ["unknown recipe 'nope'", "tiny"]),
    ("cfg-kv-heads", "", "model.num_kv_heads=3", ["model.num_kv_heads: must divide model.num_heads=4, got 3",
                                                   "valid values: 1, 2, 4"]),
    ("cfg-heads-hidden", "", "model.num_heads=3 model.num_kv_heads=1",
     ["model.head_dim", "model.hidden_size=64", "model.num_heads=3", "1, 2, 4, 8, 16, 32, 64"]),
    ("cfg-ulysses-heads", "", "WORLD_SIZE=8 parallel.sp.ulysses=8",
     ["parallel.sp.ulysses=8 does not divide model.num_heads=4", "[1, 2, 4]"]),
    ("cfg-ulysses-world", "", "WORLD_SIZE=2 parallel.sp.ulysses=3", ["does not divide the world size 2"]),
    ("cfg-seq-len-sp", "", "WORLD_SIZE=2 parallel.sp.ulysses=2 data.seq_len=255", ["data.seq_len=255"]),
    ("cfg-batch", "", "data.global_batch_size=3", ["data.global_batch_size"]),
    ("cfg-world-size", "", "WORLD_SIZE=two", ["WORLD_SIZE: must be a positive whole number"]),
    ("cfg-offload", "", "zero.offload_params=cpu", ["zero.offload_params", "zero.stage=3"]),
    ("cfg-streambp", "", "memory.offload_checkpoints=true", ["memory.offload_checkpoints",
                                                              "memory.streambp.enabled=true"]),
    ("cfg-beta", "", "optim.beta2=1.0", ["optim.beta2: must be in [0, 1), got 1.0"]),
    ("cfg-keep", "", "checkpoint.keep=0", ["checkpoint.keep: must be at least 1"]),
    ("cfg-sweep", "", "--multirun optim.lr=1e-3,-1", ["optim.lr: must be positive, got -1.0"]),
    ("cfg-interpolation", "", "run.name=${nope.key}", ["run.name"]),
    ("cfg-device", "", "trainer.device=tpu", ["trainer.device: must be auto, cpu or cuda"]),
    ("cfg-backend", "", "parallel.backend=nccl", ["parallel.backend: nccl needs CUDA devices"]),
    # ---------------------------------------------------------------- data
    ("data-missing", "", "data.source={tmp}/nope.jsonl", ["data.source: '{tmp}/nope.jsonl' does not exist"]),
    ("data-bad-json", "", "data.source={tmp}/bad.jsonl", ["data.source: line 3 of '{tmp}/bad.jsonl' is not valid JSON"]),
    ("data-not-object", "", "data.source={tmp}/list.jsonl", ["data.source: line 2 of '{tmp}/list.jsonl'"]),
    ("data-extension", "", "data.eval_source={tmp}/corpus.csv", ["data.eval_source: unsupported extension '.csv'"]),
    ("data-empty", "", "data.source={tmp}/empty.jsonl", ["data.source: '{tmp}/empty.jsonl' is empty"]),
    ("data-blank-txt", "", "data.source={tmp}/blank.txt", ["data.source: '{tmp}/blank.txt' is empty"]),
    ("data-not-utf8", "", "data.source={tmp}/latin1.jsonl", ["data.source", "latin1.jsonl", "not UTF-8"]),
    ("data-no-field", "", "data.source={tmp}/notext.jsonl", ["data.source", "no field 'text'", "body"]),
    ("data-torn-json", "", "data.source={tmp}/torn.json", ["data.source", "torn.json"]),
    ("data-folder-empty", "", "data.source={tmp}/nofiles", ["data.source: folder '{tmp}/nofiles' holds no"]),
    ("data-folder-mixed", "", "data.source={tmp}/mixed", ["data.source: folder '{tmp}/mixed' mixes file types"]),
    ("data-tok-missing", "", "data.tokenizer={tmp}/nope", ["data.tokenizer: '{tmp}/nope' is not 'byte'"]),
    ("data-tok-empty", "", "data.tokenizer={tmp}/tok_empty", ["data.tokenizer: '{tmp}/tok_empty' holds no tokenizer"]),
    ("data-tok-corrupt", "", "data.tokenizer={tmp}/tok_corrupt", ["data.tokenizer: cannot load a tokenizer from"]),
    ("data-cache-file", "", "data.cache_dir={tmp}/a_file", ["data.cache_dir: '{tmp}/a_file' exists and is not a "
                                                            "directory"]),
    ("data-cache-under-file", "", "data.cache_dir={tmp}/a_file/cache",
     ["data.cache_dir: cannot create '{tmp}/a_file/cache': '{tmp}/a_file' is a file"]),
    ("data-domain-field", "", "data.domain_field=topic", ["data.source", "passkey records carry no domain"]),
    ("data-vocab", "", "model.vocab_size=100", ["data.source: token id", "vocabulary of size 100"]),
    # ---------------------------------------------------------------- checkpoints
    ("ck-missing", "", "checkpoint.resume={tmp}/nowhere", ["checkpoint.resume: no checkpoint at '{tmp}/nowhere'"]),
    ("ck-other-model", "ck", "checkpoint.resume={ck} model.hidden_size=96",
     ["checkpoint.resume: {ck}/" + STEP2 + " holds a different model", "hidden_size 64 vs 96",
      "checkpoint.resume=none or another run.dir"]),
    ("ck-other-arch", "ck", "checkpoint.resume={ck} model.name=tiny_qwen3",
     ["holds a different model", "arch 'llama' vs 'qwen3'", "qk_norm"]),
    ("ck-own-run-other-model", "ck", "run.dir={ck} model.num_layers=3",
     ["holds a different model", "num_layers 2 vs 3", "in another run.dir"]),
    ("ck-seq-len", "ck", "checkpoint.resume={ck} data.seq_len=512", ["data.seq_len: the checkpoint", "data.seq_len=256"]),
    ("ck-seed", "ck", "checkpoint.resume={ck} trainer.seed=3", ["trainer.seed: the checkpoint", "trainer.seed=0"]),
    ("ck-truncated", "ck_trunc2", "checkpoint.resume={ck}/" + STEP2,
     ["checkpoint.resume: '{ck}/" + STEP2 + "' is incomplete", "model.safetensors",
      "the previous intact checkpoint is {ck}/" + STEP1, "checkpoint.resume={ck}/" + STEP1]),
    ("ck-torn-manifest", "ck_manifest2", "checkpoint.resume={ck}/" + STEP2,
     ["'{ck}/" + STEP2 + "'", "unreadable manifest.json", "checkpoint.resume={ck}/" + STEP1]),
    ("ck-flipped", "ck_flip2", "checkpoint.resume={ck}/" + STEP2,
     ["checkpoint.resume: '{ck}/" + STEP2 + "' is corrupted", "sha256", "checkpoint.resume={ck}/" + STEP1]),
    ("ck-first-truncated", "ck_trunc_both", "checkpoint.resume={ck}/" + STEP1,
     ["'{ck}/" + STEP1 + "' is incomplete", "no earlier intact checkpoint", "checkpoint.resume=none"]),
    ("ck-auto-none-intact", "ck_trunc_both", "run.dir={ck}", ["checkpoint.resume=auto", "none is complete"]),
    ("ck-none-over-existing", "ck", "run.dir={ck} checkpoint.resume=none",
     ["checkpoint.resume: run.dir '{ck}' already holds checkpoint", "choose another run.dir"]),
    # a state file that would run code when unpickled (support/planted.py): refused, never loaded
    *((f"ck-code-{k.split('_code_')[1].replace('_', '-')}{'-zero' if k.startswith('ckz') else ''}", k,
       "checkpoint.resume={ck}", ["checkpoint.resume: '{ck}/" + STEP2 + "/" + rel + "' holds the global posix.system",
                                  "code, not data", "a checkpoint you trust"]) for k, rel in PLANTED.items()),
    ("ck-code-own-run", "ck_code_scheduler", "run.dir={ck}",
     ["checkpoint.resume: '{ck}/" + STEP2 + "/scheduler.pt' holds the global posix.system"]),
    # ---------------------------------------------------------------- HF import
    ("hf-missing", "", "nomodel model.hf_path={tmp}/nohf", ["model.hf_path: '{tmp}/nohf' does not exist"]),
    ("hf-is-file", "hf_is_file", "nomodel model.hf_path={hf}", ["model.hf_path: '{hf}' is not a directory"]),
    ("hf-no-config", "hf_no_config", "nomodel model.hf_path={hf}", ["model.hf_path: no config.json in '{hf}'"]),
    ("hf-torn-config", "hf_torn_config", "nomodel model.hf_path={hf}",
     ["model.hf_path: '{hf}/config.json' is not valid JSON", "line 1 column"]),
    ("hf-list-config", "hf_list_config", "nomodel model.hf_path={hf}", ["'{hf}/config.json' holds a JSON list"]),
    ("hf-model-type", "hf_model_type", "nomodel model.hf_path={hf}", ["model_type 'gpt2' is not supported"]),
    ("hf-missing-keys", "hf_missing_keys", "nomodel model.hf_path={hf}", ["config.json lacks hidden_size"]),
    ("hf-no-weights", "hf_no_weights", "nomodel model.hf_path={hf}",
     ["neither model.safetensors nor model.safetensors.index.json in '{hf}'", "the directory must hold config.json"]),
    ("hf-truncated", "hf_trunc", "nomodel model.hf_path={hf}", ["model.hf_path: '{hf}/model.safetensors' is truncated",
                                                                "copy the file again"]),
    ("hf-bad-header", "hf_header", "nomodel model.hf_path={hf}",
     ["'{hf}/model.safetensors' is not a readable safetensors file"]),
    ("hf-index-shard", "hf_index_missing", "nomodel model.hf_path={hf}", ["names 1 missing shard",
                                                                          "model-00001-of-00002.safetensors"]),
    ("hf-index-torn", "hf_index_torn", "nomodel model.hf_path={hf}",
     ["'{hf}/model.safetensors.index.json' is not valid JSON"]),
    ("hf-shape", "hf_shape", "nomodel model.hf_path={hf}", ["model.hf_path: tensor", "check the model geometry"]),
    ("hf-heads", "hf_heads", "nomodel model.hf_path={hf}", ["model.num_kv_heads: must divide model.num_heads=4"]),
    ("hf-override", "hf", "model.hf_path={hf}", ["model.hidden_size: the geometry comes from model.hf_path"]),
    # ---------------------------------------------------------------- environment
    ("env-run-dir-file", "", "run.dir={tmp}/a_file", ["run.dir: '{tmp}/a_file' exists and is not a directory"]),
    ("env-run-dir-under-file", "", "run.dir={tmp}/a_file/run",
     ["run.dir: cannot create '{tmp}/a_file/run': '{tmp}/a_file' is a file, not a directory"]),
    # sysfs refuses mkdir even to root, whom os.access lets through (EPERM; EACCES for other users)
    ("env-run-dir-mkdir-refused", "", "run.dir=/sys/longtrain-run", ["run.dir: cannot", "'/sys/longtrain-run'",
                                                                     "choose"]),
]


@pytest.mark.parametrize("case_id, kind, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, request, trained, hf_dir, case_id, kind, args, expected):
    write_inputs(tmp_path)
    source = request.getfixturevalue("trained_zero") if kind.startswith("ckz") else trained
    names = prepare(kind, tmp_path, source, hf_dir)
    words = [w.format(**names) if "${" not in w else w for w in args.split()]
    env = dict(w.split("=", 1) for w in words if w.split("=")[0].isupper())
    words = [w for w in words if not w.split("=")[0].isupper()]
    base = [] if "nomodel" in words else list(MODEL)
    words = [w for w in words if w != "nomodel"]
    run_dir = tmp_path / "run"
    if not any(w.startswith("run.dir=") for w in words):
        words.append(f"run.dir={run_dir}")
    if not any(w.startswith("data.cache_dir=") for w in words):
        words.append(f"data.cache_dir={tmp_path.parent / 'cache'}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, stderr = run_cli([*base, *REST, *words], env=env)
    assert_one_error(code, stderr, [e.format(**names) for e in expected])
    assert not run_dir.exists(), "a refused start left its run.dir behind"
    if "ck" in names and kind.startswith("ck"):
        assert not (names["ck"] / "config.yaml").read_text().count("num_layers: 3"), "config.yaml overwritten"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "files written by a refused start"
    assert not (tmp_path / MARKER).exists(), "the planted code ran"


def test_the_table_is_large_enough():
    groups = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 60 and groups == {"cfg", "data", "ck", "hf", "env"}


# ------------------------------------------------------------------------------ failures the filesystem reports
@pytest.mark.parametrize("err_no, cause", [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "the disk is full"),
                                           (errno.EACCES, "permission denied")])
def test_filesystem_refusal_after_the_checks_is_one_line(tmp_path, monkeypatch, err_no, cause):
    # The checks passed, then the file system says no while the start writes run.dir: the boundary
    # names the key, the path and the cause, and removes what the start created.
    import longtrain.trainer.metrics as metrics

    def refuse(run_dir, text):
        raise OSError(err_no, os.strerror(err_no), str(Path(run_dir) / "config.yaml"))

    monkeypatch.setattr(metrics, "save_resolved_config", refuse)
    run_dir = tmp_path / "run"
    code, stderr = run_cli([*MODEL, *REST, "trainer.max_steps=1", f"run.dir={run_dir}",
                            f"data.cache_dir={tmp_path / 'cache'}"])
    assert_one_error(code, stderr, [f"run.dir: cannot use '{run_dir}/config.yaml': {cause}"])
    assert not run_dir.exists()


@pytest.mark.parametrize("key", ["run.dir", "data.cache_dir"])
def test_read_only_file_system_is_told_apart(tmp_path, monkeypatch, key):
    # No read-only mount can be made here: the check sees one through os.access and os.statvfs.
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access, real_statvfs = os.access, os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if Path(p) == ro else real_statvfs(p))
    paths = {"run.dir": f"{tmp_path}/run", "data.cache_dir": f"{tmp_path}/cache", key: f"{ro}/x"}
    code, stderr = run_cli([*MODEL, *REST, *(f"{k}={v}" for k, v in paths.items())])
    assert_one_error(code, stderr, [f"{key}: cannot write '{ro}/x' in '{ro}': read-only file system",
                                    "writable file system"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["run.dir", "data.cache_dir"])
def test_mkdir_refused_where_permissions_allow_it(tmp_path, monkeypatch, key):
    # A file system that refuses mkdir although os.access allows it (sysfs, procfs, some mounts):
    # the check makes a probe directory, which the file system refuses here.
    import tempfile as tempfile_module

    real_mkdtemp = tempfile_module.mkdtemp
    refusing = tmp_path / "refusing"
    refusing.mkdir()

    def mkdtemp(*args, dir=None, **kw):
        if dir is not None and Path(dir) == refusing:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(Path(dir) / "probe"))
        return real_mkdtemp(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile_module, "mkdtemp", mkdtemp)
    paths = {"run.dir": f"{tmp_path}/run", "data.cache_dir": f"{tmp_path}/cache", key: f"{refusing}/x"}
    code, stderr = run_cli([*MODEL, *REST, *(f"{k}={v}" for k, v in paths.items())])
    assert_one_error(code, stderr, [f"{key}: cannot use '{refusing}/x': operation not permitted",
                                    f"(set {key})"])
    assert not (tmp_path / "run").exists() and list(refusing.iterdir()) == []


def test_hydra_making_run_dir_fails_inside_the_boundary(tmp_path, monkeypatch):
    # Should the checks pass and Hydra's own creation of run.dir fail (a race, a file system the
    # probe could not see), that too ends in the one line naming run.dir, not Hydra's traceback.
    import longtrain.precheck as precheck_module

    if not Path("/sys").is_dir():
        pytest.skip("no /sys to refuse mkdir")
    monkeypatch.setattr(precheck_module, "writable_dir_problem", lambda key, value: None)
    code, stderr = run_cli([*MODEL, *REST, "run.dir=/sys/longtrain-run", f"data.cache_dir={tmp_path / 'cache'}"])
    assert_one_error(code, stderr, ["run.dir: cannot use '/sys/longtrain-run'", "(set run.dir)"])
    assert os.environ.get("HYDRA_FULL_ERROR") is None


def test_checks_stay_one_line_under_full_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "longtrain.train", "trainer.max_steps=0", f"run.dir={tmp_path}/r"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "LONGTRAIN_FULL_ERROR": "1"},
                          timeout=120)
    assert_one_error(proc.returncode, proc.stderr, ["trainer.max_steps: must be at least 1"])


def test_full_error_variable_raises_with_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTRAIN_FULL_ERROR", "1")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(ValueError, match="data.source"):
        write_inputs(tmp_path)
        run_cli([*MODEL, *REST, f"data.source={tmp_path}/bad.jsonl", f"run.dir={tmp_path}/r",
                 f"data.cache_dir={tmp_path / 'cache'}"])
    os.environ.pop("HYDRA_FULL_ERROR", None)


# ------------------------------------------------------------------------------ real processes
def unprivileged():
    """The uid/gid to run as without root's permissions, or None."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return None


def as_user(ids, action):
    """``action()``'s result (JSON-serialisable) computed in a forked child that dropped to ``ids``
    (uid, gid). The site-packages of this interpreter may not be readable by that user, so the
    caller composes the config first and the child only checks it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(ids[1])
                os.setuid(ids[0])
            result = action()
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            result = f"child failed: {type(e).__name__}: {e}"
        os.write(write_end, json.dumps(result).encode())
        os.close(write_end)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data.decode())


@pytest.mark.parametrize("key", ["run.dir", "data.cache_dir"])
def test_unwritable_directory_as_an_unprivileged_user(key):
    ids = unprivileged()
    if ids is None:
        pytest.skip("no unprivileged user to run as (root, and no 'nobody' account)")
    base = Path(tempfile.mkdtemp(prefix="longtrain-perm-"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        home = base / "home"
        home.mkdir()
        os.chown(home, *ids)
        paths = {"run.dir": f"{home}/run", "data.cache_dir": f"{home}/cache", key: f"{locked}/x"}
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        from longtrain.config import register_configs
        from longtrain.errors import error_line
        from longtrain.precheck import RECIPES_DIR, check_paths

        register_configs()
        with initialize_config_dir(config_dir=RECIPES_DIR, version_base=None):
            cfg = OmegaConf.to_object(compose("tiny", [*MODEL, *REST, *(f"{k}={v}" for k, v in paths.items())]))

        def check():
            try:
                check_paths(cfg)
            except Exception as err:  # noqa: BLE001 - the CLI's boundary turns it into its line
                return list(error_line(err, cfg))
            return ["", 0]

        line, code = as_user(ids, check)
        assert_one_error(code, line, [f"{key}: cannot write '{locked}/x' in '{locked}': permission denied",
                                      f"choose another {key}"])
        assert not (home / "run").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_console_entry_has_no_traceback_when_run_dir_is_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "longtrain.train", f"run.dir={tmp_path}/f/run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert_one_error(proc.returncode, proc.stderr, [f"run.dir: cannot create '{tmp_path}/f/run'"])


def test_console_entry_run_dir_where_mkdir_is_refused():
    if not Path("/sys").is_dir():
        pytest.skip("no /sys to refuse mkdir")
    proc = subprocess.run([sys.executable, "-m", "longtrain.train", "run.dir=/sys/x", "trainer.max_steps=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_one_error(proc.returncode, proc.stderr, ["run.dir: cannot", "'/sys/x'"])
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def launch(*args, **env):
    return subprocess.run(["bash", str(REPO / "launch" / "run.sh"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)


def test_launcher_checks_once_and_never_starts_torchrun(tmp_path):
    marker = tmp_path / "torchrun_started"
    proc = launch("--nproc", "2", "parallel.sp.ulysses=3", f"run.dir={tmp_path}/run",
                  TORCHRUN=f"touch {marker}")
    assert_one_error(proc.returncode, proc.stderr, ["parallel.sp.ulysses x parallel.sp.ring = 3 x 1 = 3 does not "
                                                    "divide the world size 2"])
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_launcher_shows_the_ranks_line_last(tmp_path):
    # The config passes the check; both ranks fail while reading the data. torchrun reports its
    # ChildFailedError, then the launcher repeats the rank's line and exit code.
    write_inputs(tmp_path)
    proc = launch("--nproc", "2", *MODEL, *REST, f"data.source={tmp_path}/bad.jsonl", f"run.dir={tmp_path}/run",
                  f"data.cache_dir={tmp_path}/cache")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("longtrain: error: data.source: line 3 of"), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()
