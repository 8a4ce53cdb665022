"""Expert load by data domain at evaluation: counts, specialisation numbers and the heat map.

During evaluation every MoE block records which experts each token chose; with a domain label per
token (``data.domain_field`` or the built-in ``domains`` source) the trainer sums, per domain,
layer and expert, the assignments ``counts[d, l, e]`` over the whole eval set (all ranks). From
them:

- ``share[d, l, e]``: the fraction of domain ``d``'s assignments in layer ``l`` that went to
  expert ``e`` (each row sums to 1);
- specialisation of a domain in a layer: the share of its ``top_k`` most used experts, i.e. how
  concentrated its routing is: ``top_k / E`` when the domain is spread evenly over the experts,
  1 when every token of the domain picks the same ``top_k`` experts.

The heat map (one panel per MoE layer, domains x experts, colour = share) is written to
``run.dir/plots/expert_load_step{N}.png`` with the counts beside it as JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from longtrain.models.moe import MoE
from longtrain.io import atomic_write_text, save_figure


def add_domain_counts(counts_dle: torch.Tensor, blocks: Sequence[MoE], domains_bs: torch.Tensor) -> None:
    """Add the latest forward's assignments of ``blocks`` to ``counts_dle`` [D, L, E] by the domain
    of each token (``domains_bs`` [B, S], the same tokens as the forward; -1: no domain, skipped)."""
    num_domains, _, num_experts = counts_dle.shape
    for layer, block in enumerate(blocks):
        experts_tk = block.last_routing.experts
        domain_t = domains_bs.reshape(-1).to(experts_tk.device)
        if domain_t.numel() != experts_tk.shape[0]:
            raise ValueError(f"domain labels cover {domain_t.numel()} tokens but the forward routed "
                             f"{experts_tk.shape[0]}")
        keep = domain_t >= 0
        index = (domain_t[keep].unsqueeze(1) * num_experts + experts_tk[keep]).reshape(-1)
        counts_dle[:, layer] += torch.bincount(index, minlength=num_domains * num_experts).view(
            num_domains, num_experts).to(counts_dle.dtype).to(counts_dle.device)


def specialisation(counts_dle: np.ndarray, top_k: int) -> np.ndarray:
    """[D, L] share of each domain's assignments that its ``top_k`` most used experts receive
    (NaN for a domain with no tokens)."""
    counts = np.asarray(counts_dle, dtype=np.float64)
    totals = counts.sum(-1)
    top = -np.sort(-counts, axis=-1)[..., :top_k].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, top / totals, np.nan)


def summarise(counts_dle: np.ndarray, domain_names: Sequence[str], top_k: int) -> Dict[str, float]:
    """Eval metrics: ``moe_specialisation`` (mean over domains and layers) and one
    ``moe_specialisation/{domain}`` per domain (mean over layers)."""
    spec = specialisation(counts_dle, top_k)
    out = {"moe_specialisation": float(np.nanmean(spec))}
    for d, name in enumerate(domain_names):
        if np.isfinite(spec[d]).any():
            out[f"moe_specialisation/{name}"] = float(np.nanmean(spec[d]))
    return out


def write_expert_load(counts_dle: np.ndarray, domain_names: Sequence[str], layer_ids: Sequence[int], top_k: int,
                      step: int, plots_dir: os.PathLike) -> Path:
    """Write ``expert_load_step{step}.png`` (the heat map) and ``.json`` (counts, shares,
    specialisation) under ``plots_dir``; returns the PNG's path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts_dle, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    spec = specialisation(counts, top_k)
    num_domains, num_layers, num_experts = counts.shape
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    stem = plots_dir / f"expert_load_step{step:07d}"
    record = {"step": step, "domains": list(domain_names), "layers": list(layer_ids), "top_k": top_k,
              "counts": counts.tolist(), "specialisation": np.where(np.isfinite(spec), spec, None).tolist()}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record) + "\n")

    cols = min(num_layers, 4)
    rows = -(-num_layers // cols)
    fig = Figure(figsize=(1.6 + 0.3 * num_experts * cols, 0.8 + (0.3 * num_domains + 0.9) * rows), dpi=110,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes: List = [fig.add_subplot(rows, cols, i + 1) for i in range(num_layers)]
    image = None
    for ax, layer in zip(axes, range(num_layers)):
        image = ax.imshow(shares[:, layer], aspect="auto", cmap="viridis", vmin=0.0,
                          vmax=max(float(shares.max()), 1e-9))
        ax.set_title(f"layer {layer_ids[layer]}", fontsize=9)
        ax.set_xticks(range(num_experts))
        ax.set_xticklabels([str(e) for e in range(num_experts)], fontsize=6)
        ax.set_yticks(range(num_domains))
        ax.set_yticklabels(list(domain_names) if layer % cols == 0 else [], fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
    fig.suptitle(f"share of each domain's expert assignments, step {step}", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8)
    return save_figure(fig, stem.with_suffix(".png"))
