"""Metrics logger: metrics.jsonl contents and resume, W&B modes, loss plot, peak FLOP/s table."""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from longtrain.config import WandbConfig
from longtrain.trainer import metrics as M
from longtrain.trainer.metrics import MetricsLogger, peak_flops_per_device, save_resolved_config, wandb_name
from longtrain.trainer.plots import plot_loss_curve, read_metrics
from support.helpers import FakeWandb


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logger(run_dir, start_step=0, mode="disabled", **kw):
    return MetricsLogger(run_dir, enabled=kw.pop("enabled", True), wandb_cfg=WandbConfig(mode=mode),
                         run_name="t", config={"a": 1}, total_steps=10, start_step=start_step,
                         progress=kw.pop("progress", False))


def test_jsonl_content_and_types(tmp_path):
    m = _logger(tmp_path)
    loss = 2.0 / 3.0
    m.log(1, {"loss": torch.tensor(loss, dtype=torch.float64), "lr": np.float32(1e-4),
              "tokens_per_s": np.int64(1234), "mfu": None, "eval_loss": 1.5})
    m.log(2, {"loss": loss, "counts": torch.tensor([1, 2])})
    recs = _records(tmp_path)
    assert recs[0]["step"] == 1 and recs[0]["loss"] == loss  # full precision, no rounding
    assert type(recs[0]["tokens_per_s"]) is int and recs[0]["tokens_per_s"] == 1234
    assert recs[0]["lr"] == float(np.float32(1e-4)) and recs[0]["mfu"] is None
    assert recs[1] == {"step": 2, "loss": loss, "counts": [1, 2]}
    with pytest.raises(TypeError, match="object"):
        m.log(3, {"bad": object()})
    m.close()
    m.close()  # idempotent
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "throughput.png").stat().st_size > 1000


def test_fresh_start_truncates_and_resume_drops_later_steps(tmp_path):
    m = _logger(tmp_path)
    for s in range(1, 6):
        m.log(s, {"loss": float(s)})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn line from a crash
    m = _logger(tmp_path, start_step=3)
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]
    m.log(4, {"loss": 40.0})
    m.close()
    assert [(r["step"], r["loss"]) for r in _records(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    _logger(tmp_path, start_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_disabled_rank_writes_nothing(tmp_path):
    m = _logger(tmp_path / "r1", enabled=False, mode="offline", progress=True)
    m.log(1, {"loss": 1.0})
    m.info("hello")
    m.close()
    assert not (tmp_path / "r1").exists()


def test_wandb_disabled_imports_nothing(tmp_path, monkeypatch):
    was_loaded = "wandb" in sys.modules
    if not was_loaded:
        m = _logger(tmp_path / "a")
        m.log(1, {"loss": 1.0})
        m.close()
        assert "wandb" not in sys.modules
    # Whatever ran before: an `import wandb` would now fail, so none may be attempted.
    monkeypatch.setitem(sys.modules, "wandb", None)
    m = _logger(tmp_path / "b")
    m.log(1, {"loss": 1.0})
    m.close()


def test_progress_bar_and_info(tmp_path, capsys):
    m = _logger(tmp_path, start_step=2, progress=True)
    m.log(3, {"loss": 1.25, "tokens_per_s": 12345.0})
    m.info("evaluating")
    assert m._bar.n == 3 and m._bar.total == 10
    m.close()
    out = capsys.readouterr()
    assert "evaluating" in out.out
    assert "loss=1.2500" in out.err and "tok/s=12.3k" in out.err


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


# Every key the trainer logs (loop.py, balance.py, passkey.py, moe_report.py) and its W&B name.
TRAINER_KEYS = {
    "loss": "loss/train", "aux_loss": "loss/aux",
    "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s", "mfu": "perf/mfu",
    "tokens": "perf/tokens", "tokens_per_rank": "perf/tokens_per_rank", "valid_tokens": "perf/valid_tokens",
    "sp_bytes_sent": "perf/sp_bytes_sent", "sp_comm_frac": "perf/sp_comm_frac",
    "peak_mem_gib": "memory/peak_gib", "reserved_mem_gib": "memory/reserved_gib",
    "lr": "optim/lr", "grad_norm": "optim/grad_norm", "skipped": "optim/skipped",
    "moe/lbl": "moe/lbl", "moe/z_loss": "moe/z_loss", "moe/maxvio": "moe/maxvio",
    "moe/layer1/expert_frac": "moe/layer1/expert_frac", "moe/bias_absmax": "moe/bias_absmax",
    "eval_loss": "eval/loss", "eval_moe_specialisation": "eval/moe_specialisation",
    "eval_moe_specialisation/code": "eval/moe_specialisation/code",
    "passkey_acc": "eval/passkey_acc", "passkey_acc_depth_0-20": "eval/passkey_acc_depth_0-20",
    "passkey_digit_acc": "eval/passkey_digit_acc",
}


def test_wandb_names():
    for key, name in TRAINER_KEYS.items():
        assert wandb_name(key) == name, key
    # Keys no rule knows get a group too, never the top level.
    assert wandb_name("new_thing") == "misc/new_thing"
    assert wandb_name("host_mem_gib") == "memory/host_gib"
    groups = {wandb_name(k).split("/")[0] for k in [*TRAINER_KEYS, "new_thing"]}
    assert groups == {"loss", "perf", "memory", "optim", "moe", "eval", "misc"}


def test_wandb_gets_grouped_names_jsonl_plain_keys(tmp_path, fake_wandb):
    m = _logger(tmp_path, mode="offline")
    record = {"loss": 2.0, "lr": 1e-3, "eval_moe_specialisation/code": 0.5, "moe/layer0/expert_frac": [0.25, 0.75],
              "odd": 1}
    m.log(1, record)
    m.close()
    assert _records(tmp_path) == [{"step": 1, **record}]  # the parity record keeps the trainer's keys
    (step, data), *images = fake_wandb.logged
    assert step == 1 and sorted(data) == ["eval/moe_specialisation/code", "loss/train", "misc/odd",
                                          "moe/layer0/expert_frac", "optim/lr"]
    # The plots of plots/ follow as images, at the last step, before W&B finishes.
    assert images == [(1, {"plots/loss": ("image", str(tmp_path / "plots" / "loss.png"))})]
    assert data["moe/layer0/expert_frac"].np_histogram == ([0.25, 0.75], [0, 1, 2])
    assert fake_wandb.finished == 1


def test_wandb_restart_resumes_the_same_run(tmp_path, fake_wandb):
    cfg = WandbConfig(mode="offline", project="p", entity="e", group="g", tags=["a", "b"])
    for start_step in (0, 2):
        MetricsLogger(tmp_path, True, cfg, run_name="n", config={"x": 1}, total_steps=4, start_step=start_step,
                      progress=False).close()
    first, second = fake_wandb.inits
    assert first["id"] == second["id"] == (tmp_path / "wandb_id.txt").read_text().strip()
    assert first["resume"] == second["resume"] == "allow"
    assert {k: first[k] for k in ("project", "entity", "group", "tags", "name", "config", "mode", "dir")} == {
        "project": "p", "entity": "e", "group": "g", "tags": ["a", "b"], "name": "n", "config": {"x": 1},
        "mode": "offline", "dir": str(tmp_path)}
    MetricsLogger(tmp_path / "other", True, cfg, "n", {}, 4, progress=False).close()
    assert fake_wandb.inits[2]["id"] != first["id"]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # No network, no API key, and nothing written outside tmp_path.
    for key, value in {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                       "WANDB_CACHE_DIR": str(tmp_path / "home"), "WANDB_CONFIG_DIR": str(tmp_path / "home"),
                       "WANDB_DATA_DIR": str(tmp_path / "home")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    t0 = time.time()
    m = _logger(tmp_path, mode="offline")
    m.log(1, {"loss": 2.0, "lr": 1e-3, "eval_loss": 2.5})
    m.log(2, {"loss": 1.5, "lr": 1e-3})
    m.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # A restarted job reuses the stored id. W&B names an offline run's folder by the second it
    # started and the id: start the restart in the next second so it gets a folder of its own.
    time.sleep(1.05 - time.time() % 1)
    m = _logger(tmp_path, start_step=2, mode="offline")
    m.log(3, {"loss": 1.0})
    m.close()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert time.time() - t0 < 30


def test_plot_loss_curve(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    lines = [{"step": s, "loss": 3.0 / s} for s in range(1, 20)] + [{"step": 10, "eval_loss": 0.5}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    png = plot_loss_curve(read_metrics(jsonl), tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    jsonl.write_text('{"step": 1, "lr": 0.1}\n')
    assert plot_loss_curve(read_metrics(jsonl), tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_peak_flops(monkeypatch):
    assert peak_flops_per_device(torch.device("cpu"), None) is None
    assert peak_flops_per_device(torch.device("cpu"), 100.0) == 100e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    expected = {
        "NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835.5e12,
        "NVIDIA H200": 989.4e12, "NVIDIA GH200 480GB": 989.4e12, "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA B200": 2250e12, "NVIDIA L40S": 362.05e12,
        "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "Tesla T4": None,
    }
    for name, flops in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops_per_device(torch.device("cuda", 0), None) == flops, name
    assert peak_flops_per_device(torch.device("cuda", 0), 500.0) == 500e12


def test_save_resolved_config(tmp_path):
    path = save_resolved_config(tmp_path / "run", "a: 1\n")
    assert path == tmp_path / "run" / "config.yaml" and path.read_text() == "a: 1\n"
    save_resolved_config(tmp_path / "run", "a: 2\n")
    assert path.read_text() == "a: 2\n" and sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    assert M.METRICS_FILE == "metrics.jsonl"
