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
from longtrain.trainer.metrics import (MetricsLogger, peak_flops_per_device, plot_loss_curve,
                                       save_resolved_config, wandb_name)


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
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


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


def test_wandb_names():
    assert wandb_name("loss") == "loss/train"
    assert wandb_name("lr") == "optim/lr"
    assert wandb_name("grad_norm") == "optim/grad_norm"
    assert wandb_name("tokens_per_s") == "perf/tokens_per_s"
    assert wandb_name("mfu") == "perf/mfu"
    assert wandb_name("peak_mem_gib") == "memory/peak_gib"
    assert wandb_name("eval_loss") == "eval/loss"
    assert wandb_name("passkey_acc") == "passkey_acc"


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
    # A restarted job reuses the stored id.
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
    png = plot_loss_curve(jsonl, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    jsonl.write_text('{"step": 1, "lr": 0.1}\n')
    assert plot_loss_curve(jsonl, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


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
