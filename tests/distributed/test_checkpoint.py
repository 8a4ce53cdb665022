"""Checkpoint manager: atomic publication, `latest`, retention, resume resolution, content helpers, atomic writes."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from longtrain.io import (atomic_write_bytes, atomic_write_text, load_model, load_torch, rng_state, save_model,
                          save_torch, set_rng_state, sha256_file)
from longtrain.trainer.checkpoint import CheckpointError, CheckpointManager, load_meta, verify
from support.harness import run_ranks


def _write_blob(payload: bytes = b"x" * 100):
    def write(d: Path) -> None:
        (d / "blob.bin").write_bytes(payload)
        (d / "sub").mkdir()
        (d / "sub" / "state.json").write_text("{}")
    return write


def _latest(root: Path) -> str:
    return (root / "latest").read_text().strip()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.embed.weight


def test_model_and_optimizer_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()

    def write(d: Path) -> None:
        save_model(model, d / "model.safetensors")
        save_torch(opt.state_dict(), d / "optimizer.pt")

    mgr = CheckpointManager(tmp_path / "ckpt", keep=2)
    path = mgr.save(3, write, {"step": 3, "tokens": 120})
    assert path.name == "step_00000003" and verify(path, check_hashes=True) == []
    assert load_meta(path) == {"step": 3, "tokens": 120}

    torch.manual_seed(1)
    model2 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    resumed = mgr.resolve_resume("auto")
    assert resumed == path
    load_model(model2, resumed / "model.safetensors")
    opt2.load_state_dict(load_torch(resumed / "optimizer.pt"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[k], v, rtol=0, atol=0)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st in s1["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(s2["state"][i][k], v, rtol=0, atol=0)


def test_manifest_lists_files(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    path = mgr.save(10, _write_blob(), {})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 10 and manifest["world_size"] == 1 and "time" in manifest
    assert {f["path"]: f["bytes"] for f in manifest["files"]} == {"blob.bin": 100, "sub/state.json": 2}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])


def test_latest_written_last_and_pruning(tmp_path):
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=2)
    mgr.save(10, _write_blob(), {})
    assert _latest(root) == "step_00000010"

    def write_checking(d: Path) -> None:
        # While step 20 is being written, nothing points at it and it is not published.
        assert _latest(root) == "step_00000010" and not (root / "step_00000020").exists()
        assert d.name == ".tmp-step_00000020"
        _write_blob()(d)

    mgr.save(20, write_checking, {})
    assert _latest(root) == "step_00000020"
    mgr.save(30, _write_blob(), {})
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000020", "step_00000030"]
    # Re-saving an existing step replaces it.
    mgr.save(30, _write_blob(b"y" * 7), {"again": True})
    assert load_meta(root / "step_00000030") == {"again": True}
    assert (root / "step_00000030" / "blob.bin").read_bytes() == b"y" * 7
    assert not any(p.name.startswith(".") and p.is_dir() for p in root.iterdir())


def test_failed_write_keeps_previous(tmp_path):
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=3)
    mgr.save(10, _write_blob(), {})

    def disk_full(d: Path) -> None:
        (d / "blob.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(d / "blob.bin"))

    with pytest.raises(CheckpointError) as err:
        mgr.save(20, disk_full, {})
    message = str(err.value)
    assert "\n" not in message and "the disk is full" in message and "GiB free" in message
    assert str(root / "step_00000020") in message and f"still {root / 'step_00000010'}" in message
    assert not (root / ".tmp-step_00000020").exists()
    assert _latest(root) == "step_00000010"
    assert mgr.resolve_resume("auto", check_hashes=True) == root / "step_00000010"

    def crash(d: Path) -> None:
        raise RuntimeError("killed")

    with pytest.raises(CheckpointError, match=r"RuntimeError: killed.*fix the cause") as err:
        mgr.save(20, crash, {})
    assert isinstance(err.value.__cause__, RuntimeError)
    assert not (root / ".tmp-step_00000020").exists()
    # A crash that cannot clean up (SIGKILL) leaves the temporary directory: the next save of that
    # step removes it.
    (root / ".tmp-step_00000020" / "stale").mkdir(parents=True)
    assert mgr.resolve_resume(str(root)) == root / "step_00000010"
    mgr.save(20, _write_blob(), {})
    assert not (root / ".tmp-step_00000020").exists()
    assert mgr.resolve_resume("auto") == root / "step_00000020"


def test_crash_before_latest_update(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=3)
    mgr.save(10, _write_blob(), {})
    monkeypatch.setattr(mgr, "_write_latest", lambda name: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        mgr.save(20, _write_blob(), {})
    assert verify(root / "step_00000020") == []
    assert mgr.resolve_resume("auto") == root / "step_00000010"  # `latest` decides


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_latest"])
def test_auto_skips_incomplete_or_corrupted(tmp_path, damage, caplog):
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=5)
    mgr.save(10, _write_blob(), {})
    newest = mgr.save(20, _write_blob(), {})
    if damage == "truncate":
        with open(newest / "blob.bin", "r+b") as f:
            f.truncate(50)
        assert any("50 bytes" in p for p in verify(newest))
    elif damage == "flip":  # same size: only the sha256 shows it
        with open(newest / "blob.bin", "r+b") as f:
            f.seek(37)
            f.write(b"\x01")
        assert verify(newest) == [] and mgr.resolve_resume("auto") == newest
        assert verify(newest, check_hashes=True) == [f"{newest / 'blob.bin'}: sha256 differs from the manifest"]
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
        assert verify(newest) == [f"{newest}: missing manifest.json"]
    else:
        (root / "latest").write_text("step_00000099\n")
        assert mgr.resolve_resume("auto", check_hashes=True) == newest
        return
    with caplog.at_level(logging.WARNING):
        assert mgr.resolve_resume("auto", check_hashes=True) == root / "step_00000010"
    assert "step_00000020" in caplog.text and "step_00000010" in caplog.text
    assert ("sha256 differs" if damage == "flip" else "step_00000020") in caplog.text
    with pytest.raises(ValueError, match="corrupted" if damage == "flip" else "incomplete"):
        mgr.resolve_resume(str(newest), check_hashes=True)
    # Nothing usable left: an error rather than a silent fresh start over the run's checkpoints.
    (root / "step_00000010" / "blob.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="none is complete and intact"):
        mgr.resolve_resume("auto", check_hashes=True)


def test_hash_check_detects_corruption(tmp_path):
    path = CheckpointManager(tmp_path, keep=1).save(1, _write_blob(), {})
    (path / "blob.bin").write_bytes(b"z" * 100)  # same size, different bytes
    assert verify(path) == []
    assert len(verify(path, check_hashes=True)) == 1


def test_resume_path_forms(tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    mgr = CheckpointManager(root, keep=3)
    assert mgr.resolve_resume("auto") is None
    assert mgr.resolve_resume("none") is None
    mgr.save(5, _write_blob(), {})
    step = mgr.save(7, _write_blob(), {})
    other = CheckpointManager(tmp_path / "elsewhere", keep=1)
    assert other.resolve_resume(str(run_dir)) == step
    assert other.resolve_resume(str(root)) == step
    assert other.resolve_resume(str(root / "step_00000005")) == root / "step_00000005"
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as err:
        other.resolve_resume(str(missing))
    assert str(err.value) == (f"checkpoint.resume: no checkpoint at '{missing}' "
                              "(pass auto, none, or a checkpoint directory)")
    with pytest.raises(ValueError, match="no checkpoint at"):
        other.resolve_resume(str(tmp_path / "elsewhere"))  # exists, holds nothing


def test_tied_weights(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = Tied()
    save_model(model, tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["body.bias", "body.weight", "embed.weight"]
    torch.manual_seed(1)
    model2 = Tied()
    load_model(model2, tmp_path / "model.safetensors")
    assert model2.lm_head.weight is model2.embed.weight
    torch.testing.assert_close(model2.lm_head.weight, model.embed.weight, rtol=0, atol=0)
    torch.testing.assert_close(model2.body.weight, model.body.weight, rtol=0, atol=0)

    untied = Tied()
    untied.lm_head.weight = nn.Parameter(torch.zeros(11, 4))
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\]"):
        load_model(untied, tmp_path / "model.safetensors")
    small = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_model(small, tmp_path / "model.safetensors")


def test_rng_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    save_torch(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.rand(100)
    random.random()
    set_rng_state(load_torch(tmp_path / "rng.pt"))
    got = (torch.rand(4), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1:] == expected[1:]



def _rank_main(rank: int, world_size: int, root: str) -> None:
    mgr = CheckpointManager(root, keep=1, rank=rank, world_size=world_size)

    def write(d: Path) -> None:
        save_torch({"rank": rank, "t": torch.full((3,), float(rank))}, d / f"rank_{rank}.pt")
        (d / "rng").mkdir(exist_ok=True)
        save_torch(rng_state(), d / "rng" / f"rank_{rank:05d}.pt")

    for step in (1, 2):
        path = mgr.save(step, write, {"step": step})
    # After the final barrier every rank sees the published checkpoint.
    assert mgr.resolve_resume("auto") == path
    assert load_torch(path / f"rank_{rank}.pt")["rank"] == rank


def test_two_ranks_write_one_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    run_ranks(_rank_main, 2, str(root))
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002"]
    manifest = json.loads((root / "step_00000002" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert sorted(f["path"] for f in manifest["files"]) == [
        "rank_0.pt", "rank_1.pt", "rng/rank_00000.pt", "rng/rank_00001.pt"]
    assert verify(root / "step_00000002", check_hashes=True) == []
    assert not os.path.exists(root / ".tmp-step_00000002")


def _failing_rank_main(rank: int, world_size: int, root: str) -> None:
    mgr = CheckpointManager(root, keep=3, rank=rank, world_size=world_size)

    def write(d: Path, fail: bool = False) -> None:
        if fail and rank == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save_torch({"rank": rank}, d / f"rank_{rank}.pt")

    mgr.save(1, write, {})
    ok = mgr.save(2, write, {})
    with pytest.raises(CheckpointError, match=r"step 3 .*rank 1: the disk is full"):
        mgr.save(3, lambda d: write(d, fail=True), {})
    dist.barrier()
    assert not (Path(root) / ".tmp-step_00000003").exists()
    assert mgr.resolve_resume("auto", check_hashes=True) == ok
    if rank == 0:  # same size, other bytes, in the file rank 1 hashes
        data = bytearray((ok / "rank_1.pt").read_bytes())
        data[-1] ^= 1
        (ok / "rank_1.pt").write_bytes(bytes(data))
    dist.barrier()
    assert mgr.resolve_resume("auto", check_hashes=True) == Path(root) / "step_00000001"


def test_two_ranks_agree_on_a_failed_save_and_a_corrupted_checkpoint(tmp_path):
    # A short timeout: without the agreement, rank 0 would wait at a barrier for the failed rank.
    run_ranks(_failing_rank_main, 2, str(tmp_path / "checkpoints"), timeout=30)


def test_atomic_writes_replace_the_whole_file(tmp_path):
    path = tmp_path / "latest"
    atomic_write_text(path, "step_00000001\n")
    assert atomic_write_bytes(path, b"step_00000002\n") == path
    assert path.read_text(encoding="utf-8") == "step_00000002\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary file left behind
    assert sha256_file(path) == sha256_file(path, sync=True) == hashlib.sha256(b"step_00000002\n").hexdigest()
