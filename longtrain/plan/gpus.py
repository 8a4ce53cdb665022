"""Target devices of a plan: the datasheet (memory, dense bf16 peak, HBM bandwidth) and the rates
kernels actually reach on it (:class:`Rates`, what :class:`~longtrain.plan.clock.Clock` times ops by).

Datasheet figures are NVIDIA's public ones for the SXM parts, dense (no sparsity) bf16 tensor-core
peak; memory is the capacity ``nvidia-smi`` reports (what ``torch.cuda.mem_get_info`` starts from).

- A100 SXM4 80GB: 312 TFLOP/s bf16, 2,039 GB/s HBM2e, 80 GiB (A100 datasheet, 2021).
- H100 SXM5 80GB: 989 TFLOP/s bf16 (1,979 with sparsity), 3.35 TB/s HBM3, 80 GiB (H100 datasheet).
- H200 SXM 141GB: 989 TFLOP/s bf16, 4.8 TB/s HBM3e, 141 GB (H200 product brief, 2024).
- B200 (HGX/DGX B200): 2.25 PFLOP/s bf16 dense (4.5 sparse), 8 TB/s HBM3e, 180 GB per GPU
  (DGX B200 datasheet: 1,440 GB for 8 GPUs).

Achieved rates (:data:`RATES`). Measured on one H100 80GB SXM (torch 2.11, bf16; docs/BENCHMARKS.md
holds the attention figures): a large bf16 matmul at 798 TFLOP/s (81% of the 989 peak); causal
attention forward + backward, 32 query / 8 key-value heads, head size 64, at 292 TFLOP/s on SDPA's
flash backend, 440 on cuDNN, 250 on FlexAttention, 103 on the memory-efficient backend. Everything
else is an **assumption** awaiting the GPU suite's calibration (``longtrain-plan --calibration``):

- head size 128 runs at the head size 64 figure (no same-setup measurement or published figure);
- other GPUs: the H100 figures scaled by the dense bf16 peak ratio (A100 x 312/989, H200 x 1,
  B200 x 2,250/989); for the A100 this is pessimistic for flash (FlashAttention-2 was tuned on
  Ampere) and for the B200 optimistic (flash 2 does not use Blackwell's tensor-core instructions);
- the matmul ramp: 2.7 us per GEMM, which puts a 1024^3 bf16 GEMM (2.1 GFLOP) at half the
  large-GEMM rate on an H100;
- HBM: 85% of the datasheet bandwidth for memory-bound ops (STREAM-like kernels reach ~90% on
  recent parts; PyTorch's eager elementwise kernels somewhat less);
- host link (pinned host memory <-> device, one direction): 50 GB/s on PCIe gen5 x16 (H100, H200,
  B200; 64 GB/s raw per direction), 25 GB/s on PCIe gen4 x16 (A100; 32 raw);
- host memory bandwidth a host optimizer (DeepSpeed's CPU Adam) reaches for one GPU's process:
  100 GB/s (a share of a dual-socket DDR5 server's ~600 GB/s, of which AdamW's arithmetic uses part).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

from longtrain.config import ConfigError


@dataclass(frozen=True)
class Rates:
    """What kernels reach on one GPU (module docstring gives each figure's source)."""

    matmul_flops: float
    """FLOP/s of a large bf16 GEMM."""
    matmul_ramp_s: float
    """Seconds every GEMM loses to launch, tile waves and tails (the saturation of small GEMMs)."""
    attention_flops: Dict[str, Dict[int, float]]
    """backend -> head size -> causal forward + backward FLOP/s, in the FlashAttention papers'
    convention (the backward counts 2.5 forwards), as bench/attention_kernels.py reports it."""
    hbm_fraction: float
    """Fraction of the datasheet HBM bandwidth memory-bound ops reach."""
    host_link_bytes_per_s: float
    """Pinned host <-> device copies, one direction."""
    host_memory_bytes_per_s: float
    """Host memory bandwidth of a host optimizer's step (ZeRO-Offload's CPU Adam)."""
    source: str = "table (gpus.py)"
    """Where the figures come from: the table, or the calibration file that overrode some."""


H100_ATTENTION: Dict[str, Dict[int, float]] = {
    "flash": {64: 292e12, 128: 292e12},
    "cudnn": {64: 440e12, 128: 440e12},
    "flex": {64: 250e12, 128: 250e12},
    "efficient": {64: 103e12, 128: 103e12},
}
"""Measured on one H100 (module docstring); head size 128 assumed equal to 64."""

H100_RATES = Rates(matmul_flops=798e12, matmul_ramp_s=2.7e-6, attention_flops=H100_ATTENTION, hbm_fraction=0.85,
                   host_link_bytes_per_s=50e9, host_memory_bytes_per_s=100e9)


def scaled_rates(bf16_flops: float, host_link_bytes_per_s: float = 50e9) -> Rates:
    """The H100's rates scaled to a GPU of dense bf16 peak ``bf16_flops`` (an assumption: the same
    fraction of peak)."""
    ratio = bf16_flops / 989e12
    attention = {backend: {dim: rate * ratio for dim, rate in by_dim.items()} for backend, by_dim in H100_ATTENTION.items()}
    return replace(H100_RATES, matmul_flops=H100_RATES.matmul_flops * ratio, attention_flops=attention,
                   host_link_bytes_per_s=host_link_bytes_per_s,
                   source=H100_RATES.source if ratio == 1 else "table (gpus.py): H100 figures x peak ratio")


@dataclass(frozen=True)
class Gpu:
    """One target GPU."""

    name: str
    memory_bytes: int
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    hbm_bytes_per_s: float
    rates: Optional[Rates] = field(default=None, compare=False)
    """What kernels reach on it (None: the H100's scaled by the peak ratio, :func:`scaled_rates`)."""
    host_memory_bytes: int = 256 * 2**30
    """Host memory per GPU a plan may use (``--host-mem``): the default is a DGX/HGX node's host
    memory over its 8 GPUs (2 TB for H100, H200 and B200 systems, 1 TB for A100: 256 and 128 GiB)."""

    def load(self, plan) -> float:
        """How full ``plan``'s step makes this GPU: the larger of the shares of its device memory and
        of its host memory used (1.0: exactly full; above: it does not fit)."""
        return max(plan.peak_bytes / self.memory_bytes, plan.host_bytes / self.host_memory_bytes)

    def fits(self, plan) -> bool:
        """Whether ``plan``'s peak fits this GPU's memory and its host memory the host's share."""
        return self.load(plan) <= 1

    def achieved(self) -> Rates:
        """:attr:`rates`, or the H100's scaled by the peak ratio where none are given."""
        return self.rates or scaled_rates(self.bf16_flops)


RATES: Dict[str, Rates] = {
    "a100": scaled_rates(312e12, host_link_bytes_per_s=25e9),
    "h100": H100_RATES,
    "h200": H100_RATES,
    "b200": scaled_rates(2.25e15),
}
"""Achieved rates per ``--gpu`` (module docstring: measured on the H100, the rest scaled)."""

GPUS: Dict[str, Gpu] = {
    "a100": Gpu("a100", 80 * 2**30, 312e12, 2.039e12, RATES["a100"], host_memory_bytes=128 * 2**30),
    "h100": Gpu("h100", 80 * 2**30, 989e12, 3.35e12, RATES["h100"]),
    "h200": Gpu("h200", 141 * 10**9, 989e12, 4.8e12, RATES["h200"]),
    "b200": Gpu("b200", 180 * 10**9, 2.25e15, 8.0e12, RATES["b200"]),
}


def get_gpu(name: str) -> Gpu:
    """The table entry ``name`` (case-insensitive).

    Raises:
        ConfigError: an unknown name, listing the known ones.
    """
    gpu = GPUS.get(name.lower())
    if gpu is None:
        raise ConfigError(f"--gpu: unknown GPU '{name}'; choose one of: {', '.join(GPUS)}")
    return gpu
