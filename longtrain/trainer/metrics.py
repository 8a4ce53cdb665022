"""Metrics: one writing rank appends ``metrics.jsonl``, drives the progress bar and W&B.

``metrics.jsonl`` is the record runs are compared by (loss parity), so values keep full
precision; the progress bar and W&B only display them. Every other rank gets a logger whose
methods do nothing, so the loop calls it unconditionally.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import string
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from longtrain.config import WandbConfig
from longtrain.io import atomic_write_text
from longtrain.trainer.plots import metric_lines, write_plots

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
NEEDLE_FILE = "needle.json"
"""The needle-in-a-haystack grid of the run's last evaluation (:meth:`MetricsLogger.needle`)."""

# Trainer key -> W&B name. Every name has a group (the part before the first `/`), which W&B shows
# as a panel section: loss/, perf/, memory/, optim/, eval/, moe/. metrics.jsonl keeps the plain keys.
WANDB_NAMES = {
    "loss": "loss/train",
    "aux_loss": "loss/aux",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "skipped": "optim/skipped",
    "tokens_per_s": "perf/tokens_per_s",
    "tflops": "perf/tflops",
    "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s",
    "tokens": "perf/tokens",
    "tokens_per_rank": "perf/tokens_per_rank",
    "valid_tokens": "perf/valid_tokens",
    "sp_bytes_sent": "perf/sp_bytes_sent",
    "sp_comm_frac": "perf/sp_comm_frac",
    "peak_mem_gib": "memory/peak_gib",
    "reserved_mem_gib": "memory/reserved_gib",
}
WANDB_DEFAULT_GROUP = "misc"
"""Group of keys no rule below places, so that no W&B name lands at the top level."""


def wandb_name(key: str) -> str:
    """The grouped W&B name of a trainer metric key.

    In order: the table ``WANDB_NAMES``; ``eval_x`` -> ``eval/x`` (``eval_moe_specialisation/code``
    -> ``eval/moe_specialisation/code``); ``passkey_*`` (measured at evaluation) -> ``eval/passkey_*``;
    ``x_mem_gib`` -> ``memory/x_gib``; a key that already has a group (``moe/lbl``) as it is; any
    other key -> ``misc/<key>``.
    """
    if key in WANDB_NAMES:
        return WANDB_NAMES[key]
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key.startswith("passkey_"):
        return "eval/" + key
    if key.endswith("_mem_gib"):
        return "memory/" + key[:-len("_mem_gib")] + "_gib"
    if "/" in key:
        return key
    return f"{WANDB_DEFAULT_GROUP}/{key}"


def _wandb_value(value: Any) -> Any:
    """A list of numbers (e.g. ``moe/layer{i}/expert_frac``) becomes a W&B histogram with one bin
    per position, so each expert is a bar and the steps stack into a heat map; others pass as is."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        import wandb

        return wandb.Histogram(np_histogram=(value, list(range(len(value) + 1))))
    return value


def format_needle(grid: Dict[str, Any]) -> str:
    """The needle grid as a table: one row per depth, one column per length, accuracy in each cell."""
    head = ["depth"] + [f"{n} ({m}x)" if m else str(n) for n, m in
                        zip(grid["lengths"], grid.get("multiples") or [None] * len(grid["lengths"]))]
    rows = [[f"{round(100 * d)}%"] + ["-" if v is None else f"{v:.2f}" for v in accs]
            for d, accs in zip(grid["depths"], grid["acc"])]
    rows.append(["all"] + ["-" if v is None else f"{v:.2f}" for v in grid["overall"]])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    scaling = grid.get("rope_scaling")
    beyond = f"; beyond 1x with {scaling['rope_type']} RoPE scaling x{scaling['factor']}" if scaling else ""
    return (f"needle in a haystack ({grid['samples']} keys per cell, whole-key accuracy{beyond}):\n"
            + "\n".join(lines))


def _to_json(value: Any) -> Any:
    # json.dumps hook: tensors and numpy values become Python numbers or lists (full precision).
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item() if value.size == 1 else value.tolist()
    raise TypeError(f"metric value of type {type(value).__name__} is not JSON-serialisable")


class MetricsLogger:
    """Writes ``metrics.jsonl``, a tqdm bar and W&B from the writing rank; no-op elsewhere.

    Args:
        run_dir: run directory; ``metrics.jsonl``, ``needle.json``, ``plots/`` and ``wandb/`` go here.
        enabled: True on the writing rank only.
        wandb_cfg: W&B settings (``disabled`` never imports wandb).
        run_name: W&B run name.
        config: resolved config, stored with the W&B run.
        total_steps: steps of the whole run (the bar's total, for the ETA).
        start_step: step resumed from; metrics logged after it by an earlier attempt are dropped.
        progress: show the progress bar.
    """

    def __init__(self, run_dir: Union[str, Path], enabled: bool, wandb_cfg: WandbConfig, run_name: str,
                 config: Dict[str, Any], total_steps: int, start_step: int = 0, progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._bar = None
        self._wandb_run = None
        self._closed = False
        self._needle: Optional[Dict[str, Any]] = None
        self._last_step = start_step
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_file(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if wandb_cfg.mode != "disabled":
            self._wandb_run = self._init_wandb(wandb_cfg, run_name, config)

    def _prepare_file(self, start_step: int) -> None:
        if start_step > 0 and self.path.exists():
            lines, bad = metric_lines(self.path)
            kept = [line for line in lines if int(json.loads(line)["step"]) <= start_step]
            if bad or len(kept) < len(lines):
                log.info("metrics: resuming at step %d; dropping %d later and %d unreadable lines of %s",
                         start_step, len(lines) - len(kept), bad, self.path)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        else:
            self.path.write_text("", encoding="utf-8")

    def _init_wandb(self, cfg: WandbConfig, run_name: str, config: Dict[str, Any]) -> Any:
        import wandb

        # A restarted job reuses the id so W&B continues the same run instead of starting a new one.
        id_path = self.run_dir / WANDB_ID_FILE
        if id_path.is_file() and id_path.read_text(encoding="utf-8").strip():
            run_id = id_path.read_text(encoding="utf-8").strip()
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            atomic_write_text(id_path, run_id + "\n")
        return wandb.init(mode=cfg.mode, dir=str(self.run_dir), project=cfg.project, entity=cfg.entity,
                          group=cfg.group, tags=list(cfg.tags) or None, name=run_name, config=config,
                          id=run_id, resume="allow")

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl, advance the bar, send to W&B."""
        if not self.enabled:
            return
        record = json.loads(json.dumps({"step": int(step), **metrics}, default=_to_json))
        self._last_step = max(self._last_step, int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            postfix = {}
            if isinstance(record.get("loss"), (int, float)):
                postfix["loss"] = f"{record['loss']:.4f}"
            if isinstance(record.get("tokens_per_s"), (int, float)):
                postfix["tok/s"] = tqdm.format_sizeof(record["tokens_per_s"])
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        if self._wandb_run is not None:
            self._wandb_run.log({wandb_name(k): _wandb_value(v) for k, v in record.items() if k != "step"},
                                step=int(step))

    def image(self, step: int, key: str, path: Union[str, Path]) -> None:
        """Send the image file ``path`` to W&B under ``key`` (the file itself is already in run.dir)."""
        if self.enabled and self._wandb_run is not None:
            import wandb

            self._wandb_run.log({key: wandb.Image(str(path))}, step=int(step))

    def info(self, msg: str) -> None:
        """Print a line on the writing rank without breaking the progress bar."""
        if self.enabled:
            tqdm.write(msg)

    def needle(self, step: int, grid: Dict[str, Any]) -> None:
        """Keep the needle-in-a-haystack grid of step ``step`` (``run.dir/needle.json``; its heat map is
        drawn at :meth:`close`) and print its table."""
        if not self.enabled:
            return
        self._needle = {"step": int(step), **grid}
        atomic_write_text(self.run_dir / NEEDLE_FILE, json.dumps(self._needle, indent=1) + "\n")
        self.info(format_needle(grid))

    def close(self) -> None:
        """Close the bar, draw ``plots/`` (sent to W&B as images), finish W&B; safe to call twice."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        try:
            for name, png in write_plots(self.run_dir / "plots", self.path, self._needle).items():
                self.image(self._last_step, f"plots/{name}", png)
        except Exception as e:  # a failed plot must not fail a finished run
            log.warning("metrics: could not draw the plots: %s", e)
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# Dense (no sparsity) bf16 tensor-core peaks per device, FLOP/s, from vendor datasheets.
# Order matters: the first pattern found in the device name wins.
_PEAK_BF16 = [
    (r"GH200", 989.4e12),
    (r"H200 NVL", 835.5e12),
    (r"H200", 989.4e12),
    (r"H100.*PCIe", 756e12),
    (r"H100 NVL", 835.5e12),
    (r"H100|H800", 989.4e12),
    (r"GB200", 2500e12),
    (r"B200", 2250e12),
    (r"B100", 1750e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362.05e12),
    (r"L40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"MI300X", 1307.4e12),
]


def peak_flops_per_device(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device, for MFU.

    Args:
        device: the training device.
        override_tflops: ``logging.peak_tflops``; when set it wins (TFLOP/s).

    Returns:
        FLOP/s, or None on CPU and on GPUs not in the table (MFU is then not reported).
    """
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, flops in _PEAK_BF16:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return flops
    log.info("metrics: unknown peak FLOP/s for %r; set logging.peak_tflops to report MFU", name)
    return None


def save_resolved_config(run_dir: Union[str, Path], config_yaml: str) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` atomically; returns the path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    atomic_write_text(path, config_yaml)
    return path
