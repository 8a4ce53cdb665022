"""``longtrain-plan --calibration FILE``: measured kernel rates that override the clock's table.

Two kinds of file are read (JSON either way):

- the GPU suite's ``gpu_suite.json`` (``bench/gpu_suite.py``; recognised by its ``stages`` key): the
  attention rows of its ``kernels`` stage (``stages.kernels.rows``, written by
  ``bench/attention_kernels.py``). The rows that time the planner's own calls (``impl`` ``block``:
  the block kernels every caller runs) on one document per row (``docs`` ``none``), ``ok`` and with a
  ``tflops`` figure, give ``attention_tflops[block_backend][D]``, the mean over their sequence
  lengths. The file must come from a GPU run (``meta.dry_run`` false) on the planned GPU
  (``meta.planner_gpu`` equal to ``--gpu`` where it is given);
- a small file of one's own, every key optional::

      {"matmul_tflops": 780, "matmul_ramp_us": 3.0,
       "attention_tflops": {"flash": {"64": 300, "128": 380}, "cudnn": {"64": 450}},
       "hbm_fraction": 0.9, "host_link_gbps": 52, "host_memory_gbps": 120}

  (TFLOP/s of a large bf16 GEMM; microseconds each GEMM loses; causal forward + backward TFLOP/s
  per backend and head size in the FlashAttention convention; the fraction of datasheet HBM
  bandwidth memory-bound ops reach; pinned host <-> device GB/s one way; host memory GB/s of a host
  optimizer).

What the file holds replaces the table's figure; the rest stays (:class:`~longtrain.plan.gpus.Rates`).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from typing import Dict, List, Optional

from longtrain.config import ConfigError
from longtrain.plan.gpus import Gpu, Rates

KEYS = {"matmul_tflops": ("matmul_flops", 1e12), "matmul_ramp_us": ("matmul_ramp_s", 1e-6),
        "hbm_fraction": ("hbm_fraction", 1.0), "host_link_gbps": ("host_link_bytes_per_s", 1e9),
        "host_memory_gbps": ("host_memory_bytes_per_s", 1e9)}
"""Scalar keys of one's own file -> (:class:`Rates` field, unit)."""


def _fail(path: str, problem: str) -> ConfigError:
    return ConfigError(f"--calibration: {path}: {problem}")


def _positive(path: str, key: str, value, zero: bool = False) -> float:
    """``value`` as a float, when it is a number above 0 (or 0 too with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 if zero else value > 0):
        raise _fail(path, f"{key} must be a {'non-negative' if zero else 'positive'} number, got {value!r}")
    return float(value)


def _attention(path: str, table, where: str) -> Dict[str, Dict[int, float]]:
    """``{backend: {head size: TFLOP/s}}`` of a file, in FLOP/s with integer head sizes."""
    if not isinstance(table, dict):
        raise _fail(path, f"{where} must map a backend to {{head size: TFLOP/s}}, got {table!r}")
    out: Dict[str, Dict[int, float]] = {}
    for backend, by_dim in table.items():
        if not isinstance(by_dim, dict) or not by_dim:
            raise _fail(path, f"{where}.{backend} must map a head size to TFLOP/s, got {by_dim!r}")
        for dim, rate in by_dim.items():
            try:
                head = int(dim)
            except (TypeError, ValueError):
                head = 0
            if head <= 0:
                raise _fail(path, f"{where}.{backend}: head size {dim!r} is not a positive integer")
            out.setdefault(str(backend), {})[head] = _positive(path, f"{where}.{backend}.{dim}", rate) * 1e12
    return out


def _suite_rows(path: str, doc: dict, gpu: Gpu) -> Dict[str, Dict[int, float]]:
    """The attention rates of a ``gpu_suite.json`` (module docstring)."""
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    if meta.get("dry_run"):
        raise _fail(path, "a dry run of the GPU suite (meta.dry_run): its CPU rows are no calibration")
    measured_on = meta.get("planner_gpu")
    if measured_on and str(measured_on).lower() != gpu.name:
        raise _fail(path, f"measured on {measured_on} (meta.planner_gpu), not on --gpu {gpu.name}")
    stages = doc.get("stages")
    kernels = stages.get("kernels") if isinstance(stages, dict) else None
    rows = kernels.get("rows") if isinstance(kernels, dict) else None
    if not isinstance(rows, list):
        raise _fail(path, "no stages.kernels.rows (the GPU suite's kernel stage did not run)")
    found: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if not isinstance(row, dict) or row.get("impl") != "block" or row.get("docs", "none") != "none":
            continue
        rate, dim, backend = row.get("tflops"), row.get("D"), row.get("block_backend")
        if row.get("ok") and isinstance(rate, (int, float)) and rate > 0 and isinstance(dim, int) and backend:
            found[str(backend)][dim].append(float(rate) * 1e12)
    if not found:
        raise _fail(path, "stages.kernels.rows holds no measured attention row (impl block, docs none, ok, tflops)")
    return {backend: {dim: sum(v) / len(v) for dim, v in by_dim.items()} for backend, by_dim in found.items()}


def _own(path: str, doc: dict) -> dict:
    """:class:`Rates` fields of one's own file (module docstring)."""
    unknown = sorted(set(doc) - set(KEYS) - {"attention_tflops"})
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}; the keys are {', '.join([*KEYS, 'attention_tflops'])} "
                          "(or a gpu_suite.json)")
    fields = {}
    for key, (name, unit) in KEYS.items():
        if key in doc:
            fields[name] = _positive(path, key, doc[key], zero=key == "matmul_ramp_us") * unit
    if fields.get("hbm_fraction", 0) > 1:
        raise _fail(path, f"hbm_fraction must be at most 1, got {doc['hbm_fraction']!r}")
    if "attention_tflops" in doc:
        fields["attention_flops"] = _attention(path, doc["attention_tflops"], "attention_tflops")
    return fields


def calibrated(gpu: Gpu, path: Optional[str]) -> Gpu:
    """``gpu`` with the rates of the calibration file ``path`` over its table (None: ``gpu`` as is).

    Raises:
        ConfigError: one line naming ``--calibration`` and the problem (unreadable, not JSON,
            an unknown key, a value that is not a positive number, a suite file from another GPU
            or a dry run, no attention row).
    """
    if not path:
        return gpu
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as exc:
        raise _fail(path, exc.strerror or str(exc)) from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "must hold a JSON object")
    rates: Rates = gpu.achieved()
    if "stages" in doc:
        fields = {"attention_flops": _suite_rows(path, doc, gpu)}
    else:
        fields = _own(path, doc)
    if "attention_flops" in fields:  # per backend and head size: what the file lacks keeps the table's
        merged = {backend: dict(by_dim) for backend, by_dim in rates.attention_flops.items()}
        for backend, by_dim in fields["attention_flops"].items():
            merged.setdefault(backend, {}).update(by_dim)
        fields["attention_flops"] = merged
    return replace(gpu, rates=replace(rates, **fields, source=f"calibrated by {path} over the table"))


__all__ = ["KEYS", "calibrated"]
