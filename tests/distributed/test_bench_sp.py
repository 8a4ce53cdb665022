"""Sequence-parallel benchmark scripts stay runnable on CPU, and the byte formulas hold exactly.

Each script runs as a subprocess with tiny shapes and must print well-formed JSON lines. For
``bench/sp_bytes.py`` the measured bytes must equal the formulas byte for byte on every layout
(with KV-head replication, packed documents and bf16), so a change to what Ulysses or the ring
sends fails here until the formulas (and the README that copies them) are updated.
"""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["--heads", "8", "--kv-heads", "2", "--head-dim", "8"]


def _run(script: str, *args: str) -> list:
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_sp_bytes_measured_equals_formula():
    # U=4 > Hkv=2 replicates KV heads; --docs adds the document-id all-gather and ring traffic.
    rows = _run("sp_bytes.py", "--seq", "64", "--batch", "2", "--dtype", "bf16", "--docs", *TINY)
    assert [r["layout"] for r in rows] == ["ulysses2", "ulysses4", "ring2", "ring4", "ulysses2xring2"]
    for row in rows:
        assert row["match"], row
        assert row["fwd_bytes"] == row["fwd_pred"] > 0 and row["bwd_bytes"] == row["bwd_pred"] > 0, row
        assert row["fwd_ratio"] == row["bwd_ratio"] == 1.0
    hybrid = rows[-1]["parts"]
    assert all(measured > 0 for measured, _ in hybrid.values()), "the hybrid must use both Ulysses and ring"


def test_sp_bytes_formulas_by_hand():
    """The formulas at the default shape (B=1, S=4096, Hq=32, Hkv=8, D=64, fp32), written out."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from sp_bytes import predict
    finally:
        sys.path.pop(0)
    a = Namespace(batch=1, seq=4096, heads=32, kv_heads=8, head_dim=64, dtype="fp32", docs=False)
    h, hkv, b = 32 * 64, 8 * 64, 4
    assert predict(a, 2, 1) == {"ulysses_fwd": 2048 * (2 * h + 2 * hkv) * b // 2,
                                "ulysses_bwd": 2048 * (2 * h + 2 * hkv) * b // 2, "ring_fwd": 0, "ring_bwd": 0}
    assert predict(a, 1, 4)["ring_fwd"] == 3 * (2 * 1024 * hkv * b + 8 * 1024)
    assert predict(a, 1, 4)["ring_bwd"] == 3 * 2 * 1024 * hkv * b + 4 * 2 * 1024 * hkv * 4
    hybrid = predict(a, 2, 2)  # ring over S/R = 2048 tokens with Hkv/U = 4 KV heads
    assert hybrid["ring_fwd"] == 2 * 2048 * (hkv // 2) * b + 8 * 2048
    assert hybrid["ulysses_fwd"] == 1024 * (2 * h + 2 * hkv) * b // 2
    replicated = Namespace(**{**vars(a), "kv_heads": 2})  # U=4 > Hkv=2: each KV head sent twice
    assert predict(replicated, 4, 1)["ulysses_fwd"] == 3 * 1024 * (2 * h + 2 * 4 * 64) * b // 4


def test_attention_kernels_bench_prints_json():
    rows = _run("attention_kernels.py", "--device", "cpu", "--seqs", "128", "256", "--dtype", "fp32",
                "--warmup", "0", "--repeats", "1", *TINY)
    assert [(r["S"], r["docs"], r["impl"]) for r in rows] == [
        (s, d, i) for s in (128, 256) for d in ("none", "packed") for i in ("sdpa", "local", "block")]
    for row in rows:
        assert row["ok"] and row["ms"] > 0 and row["tflops"] > 0 and row["ratio_to_sdpa"] > 0, row
        assert row["num_docs"] == 1 if row["docs"] == "none" else row["num_docs"] > 1
    assert all(r["ratio_to_sdpa"] == 1.0 for r in rows if r["impl"] == "sdpa")


def test_sp_decomposition_bench_is_exact():
    rows = _run("sp_decomposition.py", "--device", "cpu", "--ranks", "2", "4", "--seqs", "128", "--dtype", "fp32",
                "--warmup", "0", "--repeats", "1", "--docs", "none", "packed", *TINY)
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        assert row["ok"] and row["ratio"] > 0 and 0 < row["balance"] <= 1.0, row
        # fp32, O(1) values: the split only reorders sums (~1e-6); a lost block or head shows as >1e-2.
        assert row["max_err"] < 1e-4, row
