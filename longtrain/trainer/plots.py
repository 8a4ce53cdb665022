"""The pictures of a run, drawn from ``metrics.jsonl`` (and the needle grid) into ``run.dir/plots``.

- ``loss.png``: training loss per step and the evaluation loss;
- ``passkey.png``: passkey retrieval accuracy over steps, overall, per depth bin and per digit;
- ``needle.png``: the needle-in-a-haystack heat map, accuracy by depth (rows) and length (columns);
- ``throughput.png``: tokens/s and peak memory per step.

A picture whose data the run did not log is skipped. Figures are drawn with matplotlib's Agg canvas
directly (no pyplot: no global backend switch, no windows) and written atomically.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from longtrain.io import save_figure

PathLike = Union[str, Path]
PLOT_NAMES = ("loss", "passkey", "needle", "throughput")
"""The pictures :func:`write_plots` draws, each ``plots/<name>.png``."""
_DEPTH_KEY = re.compile(r"passkey_acc_depth_(\d+)-(\d+)$")


def metric_lines(path: PathLike) -> Tuple[List[str], int]:
    """Lines of a metrics file that parse as JSON objects with a step, and how many did not."""
    kept, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            int(rec["step"])
            kept.append(line)
        except (ValueError, KeyError, TypeError):
            bad += 1  # e.g. a line torn by a crash mid-write
    return kept, bad


def read_metrics(jsonl_path: PathLike) -> List[dict]:
    """The records of a metrics file (:func:`metric_lines`), parsed."""
    return [json.loads(line) for line in metric_lines(jsonl_path)[0]]


def _series(records: Sequence[dict], key: str) -> List[Tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def _figure(width: float = 7.0, height: float = 4.0, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def plot_loss_curve(records: Sequence[dict], png_path: PathLike) -> Optional[Path]:
    """Training loss (and ``eval_loss`` points) against step; returns the png or None without any loss."""
    train, evals = _series(records, "loss"), _series(records, "eval_loss")
    if not train and not evals:
        return None
    fig, (ax,) = _figure()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png_path)


def plot_passkey(records: Sequence[dict], png_path: PathLike) -> Optional[Path]:
    """Passkey accuracy over steps: whole keys overall (bold), per depth bin, and per digit (dashed)."""
    overall = _series(records, "passkey_acc")
    if not overall:
        return None
    fig, (ax,) = _figure()
    depth_keys = sorted({k for r in records for k in r if _DEPTH_KEY.match(k)},
                        key=lambda k: int(_DEPTH_KEY.match(k).group(1)))
    cmap = _colormap("viridis")
    for i, key in enumerate(depth_keys):
        lo, hi = _DEPTH_KEY.match(key).groups()
        ax.plot(*zip(*_series(records, key)), linewidth=1, alpha=0.7, color=cmap(i / max(len(depth_keys) - 1, 1)),
                label=f"depth {lo}-{hi}%")
    digits = _series(records, "passkey_digit_acc")
    if digits:
        ax.plot(*zip(*digits), "--", color="grey", linewidth=1, label="per digit")
    ax.plot(*zip(*overall), "o-", color="black", linewidth=2, markersize=4, label="whole key, overall")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("step")
    ax.set_ylabel("passkey retrieval accuracy")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, png_path)


def plot_needle(grid: Dict, png_path: PathLike) -> Optional[Path]:
    """The needle-in-a-haystack heat map of a grid from :func:`needle_grid` (accuracy in each cell)."""
    lengths, depths, acc = grid.get("lengths") or [], grid.get("depths") or [], grid.get("acc") or []
    if not lengths or not depths:
        return None
    fig, (ax,) = _figure(1.6 + 1.3 * len(lengths), 1.2 + 0.45 * len(depths))
    ax.grid(False)
    values = [[math.nan if v is None else v for v in row] for row in acc]
    image = ax.imshow(values, cmap=_colormap("RdYlGn"), vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [f"{n:,}" + (f"\n({m}x)" if m else "") for n, m in
                                        zip(lengths, grid.get("multiples") or [None] * len(lengths))])
    ax.set_yticks(range(len(depths)), [f"{round(100 * d)}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    scaling = grid.get("rope_scaling")
    beyond = f"\nbeyond 1x: {scaling['rope_type']} RoPE scaling x{scaling['factor']}" if scaling else ""
    ax.set_title(f"passkey retrieval, {grid.get('samples', '?')} keys per cell{beyond}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    fig.tight_layout()
    return save_figure(fig, png_path)


def plot_throughput(records: Sequence[dict], png_path: PathLike) -> Optional[Path]:
    """Tokens/s (top) and peak memory (bottom) per step."""
    speed, memory = _series(records, "tokens_per_s"), _series(records, "peak_mem_gib")
    if not speed and not memory:
        return None
    fig, (top, bottom) = _figure(7.0, 5.0, rows=2)
    if speed:
        top.plot(*zip(*speed), linewidth=1)
    top.set_ylabel("tokens/s (all ranks)")
    if memory:
        bottom.plot(*zip(*memory), linewidth=1, color="tab:red")
    bottom.set_ylabel("peak memory (GiB)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    return save_figure(fig, png_path)


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def write_plots(plot_dir: PathLike, jsonl_path: PathLike, needle: Optional[Dict] = None) -> Dict[str, Path]:
    """Draw every picture the run's data allows into ``plot_dir``; returns {name: png} of those written."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(jsonl_path) if Path(jsonl_path).is_file() else []
    drawn = {"loss": plot_loss_curve(records, plot_dir / "loss.png"),
             "passkey": plot_passkey(records, plot_dir / "passkey.png"),
             "needle": plot_needle(needle, plot_dir / "needle.png") if needle else None,
             "throughput": plot_throughput(records, plot_dir / "throughput.png")}
    return {name: path for name, path in drawn.items() if path is not None}
