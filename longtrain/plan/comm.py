"""Collectives of a planned step: bytes each rank sends, the link they cross, and their time.

The planner's tracker sees every collective of the step as a ``c10d`` (or functional
``_c10d_functional``) op. :func:`collective_of` turns one into a :class:`Collective`: its kind, the
global ranks of its group, and the bytes this rank sends under the usual bandwidth-optimal
algorithms (ring all-reduce / all-gather / reduce-scatter, direct all-to-all), for a group of
``n`` ranks and a buffer of ``b`` bytes:

- all-reduce: ``2 (n - 1) / n x b``;
- all-gather: ``(n - 1) x`` the input (``(n - 1) / n`` of the output);
- reduce-scatter: ``(n - 1) / n x`` the input;
- all-to-all: ``(n - 1) / n x`` the input (the part that stays on the rank is not sent);
- send: the tensor; receive: nothing (the sender counts it); broadcast and reduce: the tensor.

Time is bandwidth only: ``bytes / link bandwidth``, the link being NVLink when every rank of the
group sits in one node (``gpus_per_node`` consecutive ranks) and the network otherwise. Latency,
congestion, NCCL's protocol choice and SHARP are not modelled.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from longtrain.config import ConfigError


@dataclass(frozen=True)
class Interconnect:
    """Per-GPU, one-direction bandwidths of a cluster (bytes/s) and its node size."""

    intra_bytes_per_s: float
    """Inside a node (NVLink / NVSwitch)."""
    inter_bytes_per_s: float
    """Between nodes (the GPU's share of the network: one NIC per GPU)."""
    gpus_per_node: int = 8

    def describe(self) -> str:
        return (f"intra-node {self.intra_bytes_per_s / 1e9:.0f} GB/s, inter-node {self.inter_bytes_per_s / 1e9:.0f} GB/s "
                f"per GPU, {self.gpus_per_node} GPUs per node")


DEFAULT_INTERCONNECT: Dict[str, Interconnect] = {
    # NVLink 3 (A100): 600 GB/s both directions; 200 Gb/s HDR InfiniBand per GPU.
    "a100": Interconnect(300e9, 25e9),
    # NVLink 4 (H100, H200): 900 GB/s both directions; 400 Gb/s NDR InfiniBand per GPU.
    "h100": Interconnect(450e9, 50e9),
    "h200": Interconnect(450e9, 50e9),
    # NVLink 5 (B200): 1.8 TB/s both directions; 400 Gb/s per GPU.
    "b200": Interconnect(900e9, 50e9),
}
"""Per-GPU defaults of ``--interconnect`` for each ``--gpu`` (datasheet figures, one direction)."""


def parse_interconnect(text: Optional[str], gpu_name: str) -> Interconnect:
    """``--interconnect intra=GBps,inter=GBps[,gpus_per_node=N]`` over the GPU's defaults.

    Raises:
        ConfigError: an unknown field or a value that is not a positive number.
    """
    base = DEFAULT_INTERCONNECT.get(gpu_name, DEFAULT_INTERCONNECT["h100"])
    if not text:
        return base
    values = {"intra": base.intra_bytes_per_s / 1e9, "inter": base.inter_bytes_per_s / 1e9,
              "gpus_per_node": float(base.gpus_per_node)}
    for item in text.split(","):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if key not in values or not eq:
            raise ConfigError(f"--interconnect: '{item}' is not one of intra=GB/s, inter=GB/s, gpus_per_node=N "
                              "(e.g. --interconnect intra=450,inter=50)")
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if value <= 0 or (key == "gpus_per_node" and value != int(value)):
            raise ConfigError(f"--interconnect: {key}={raw} must be a positive "
                              f"{'integer' if key == 'gpus_per_node' else 'number (GB/s)'}")
        values[key] = value
    return Interconnect(values["intra"] * 1e9, values["inter"] * 1e9, int(values["gpus_per_node"]))


@dataclass
class Collective:
    """One collective of the step as this rank runs it."""

    kind: str
    ranks: Tuple[int, ...]
    bytes_sent: int
    phase: str


def _group_ranks(pg) -> Tuple[int, ...]:
    import torch.distributed as dist
    from torch._C._distributed_c10d import ProcessGroup

    if isinstance(pg, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        pg = _resolve_process_group(pg)
    elif isinstance(pg, torch.ScriptObject):
        pg = ProcessGroup.unbox(pg)
    return tuple(dist.get_process_group_ranks(pg))


def _bytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_bytes(t) for t in tensors)


def _c10d(name: str, args) -> Optional[Tuple[str, object, Tuple[str, int]]]:
    """(kind, process group, (algorithm rule, buffer bytes)) of a ``c10d`` op."""
    if name == "allreduce_":
        return "all_reduce", args[1], ("ar", _bytes(args[0]))
    if name in ("allgather_", "allgather_into_tensor_coalesced_"):
        return "all_gather", args[2], ("ag", _bytes(args[1]))
    if name == "_allgather_base_":
        return "all_gather", args[2], ("ag", _bytes(args[1]))
    if name in ("reduce_scatter_", "reduce_scatter_tensor_coalesced_"):
        return "reduce_scatter", args[2], ("rs", _bytes(args[1]))
    if name == "_reduce_scatter_base_":
        return "reduce_scatter", args[2], ("rs", _bytes(args[1]))
    if name in ("alltoall_base_", "alltoall_"):
        return "all_to_all", args[2], ("a2a", _bytes(args[1]))
    if name == "send":
        return "send", args[1], ("p2p", _bytes(args[0]))
    if name == "recv_":
        return "recv", args[1], ("none", 0)
    if name in ("broadcast_", "reduce_"):
        return name.rstrip("_"), args[1], ("p2p", _bytes(args[0]))
    return None


def _functional(name: str, args) -> Optional[Tuple[str, object, Tuple[str, int]]]:
    if name in ("all_reduce", "all_reduce_"):
        return "all_reduce", args[2], ("ar", _bytes(args[0]))
    if name == "all_reduce_coalesced":
        return "all_reduce", args[2], ("ar", _bytes(args[0]))
    if name == "all_gather_into_tensor":
        return "all_gather", args[2], ("ag", _bytes(args[0]))
    if name == "reduce_scatter_tensor":
        return "reduce_scatter", args[3], ("rs", _bytes(args[0]))
    if name == "all_to_all_single":
        return "all_to_all", args[3], ("a2a", _bytes(args[0]))
    if name == "broadcast":
        return "broadcast", args[2], ("p2p", _bytes(args[0]))
    return None


def collective_of(func, args, phase: str) -> Optional[Collective]:
    """The :class:`Collective` of one dispatched op, or None (not a collective, or a wait)."""
    if func.namespace == "c10d":
        found = _c10d(func._opname, args)
    elif func.namespace == "_c10d_functional":
        found = _functional(func._opname, args)
    else:
        return None
    if found is None:
        return None
    kind, pg, (rule, size) = found
    ranks = _group_ranks(pg)
    n = len(ranks)
    sent = {"ar": 2 * (n - 1) * size // n, "ag": (n - 1) * size, "rs": (n - 1) * size // n,
            "a2a": (n - 1) * size // n, "p2p": size if n > 1 else 0, "none": 0}[rule]
    return Collective(kind, ranks, int(sent), phase)


def link_of(ranks: Iterable[int], net: Interconnect) -> str:
    """``"intra"`` when every rank of the group sits in one node, else ``"inter"``."""
    nodes = {r // net.gpus_per_node for r in ranks}
    return "intra" if len(nodes) <= 1 else "inter"


@dataclass
class CommRow:
    """The collectives of one kind over one parallel axis, summed over the step."""

    axis: str
    kind: str
    link: str
    count: int
    bytes_sent: int
    time_s: float


def summarise(collectives: List[Collective], axis_of, net: Interconnect) -> List[CommRow]:
    """One :class:`CommRow` per (axis, kind), ``axis_of(ranks)`` naming the group's axis."""
    rows: Dict[Tuple[str, str], CommRow] = {}
    for c in collectives:
        if len(c.ranks) < 2 or c.kind == "recv":
            continue
        axis = axis_of(c.ranks)
        link = link_of(c.ranks, net)
        bw = net.intra_bytes_per_s if link == "intra" else net.inter_bytes_per_s
        row = rows.setdefault((axis, c.kind), CommRow(axis, c.kind, link, 0, 0, 0.0))
        if link == "inter":
            row.link = "inter"
        row.count += 1
        row.bytes_sent += c.bytes_sent
        row.time_s += c.bytes_sent / bw
    return sorted(rows.values(), key=lambda r: -r.bytes_sent)


def by_phase(collectives: List[Collective]) -> Dict[str, int]:
    """Bytes sent per phase of the step (forward, backward, optimizer)."""
    out: Dict[str, int] = defaultdict(int)
    for c in collectives:
        out[c.phase] += c.bytes_sent
    return dict(out)


__all__ = ["Collective", "CommRow", "DEFAULT_INTERCONNECT", "Interconnect", "by_phase", "collective_of", "link_of",
           "parse_interconnect", "summarise"]
