"""Target devices of a plan: memory, dense bf16 peak and HBM bandwidth of one GPU.

Numbers are NVIDIA's public datasheet figures for the SXM parts, dense (no sparsity) bf16 tensor-core
peak; memory is the capacity ``nvidia-smi`` reports (what ``torch.cuda.mem_get_info`` starts from).

- A100 SXM4 80GB: 312 TFLOP/s bf16, 2,039 GB/s HBM2e, 80 GiB (A100 datasheet, 2021).
- H100 SXM5 80GB: 989 TFLOP/s bf16 (1,979 with sparsity), 3.35 TB/s HBM3, 80 GiB (H100 datasheet).
- H200 SXM 141GB: 989 TFLOP/s bf16, 4.8 TB/s HBM3e, 141 GB (H200 product brief, 2024).
- B200 (HGX/DGX B200): 2.25 PFLOP/s bf16 dense (4.5 sparse), 8 TB/s HBM3e, 180 GB per GPU
  (DGX B200 datasheet: 1,440 GB for 8 GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from longtrain.config import ConfigError


@dataclass(frozen=True)
class Gpu:
    """One target GPU."""

    name: str
    memory_bytes: int
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    hbm_bytes_per_s: float


GPUS: Dict[str, Gpu] = {
    "a100": Gpu("a100", 80 * 2**30, 312e12, 2.039e12),
    "h100": Gpu("h100", 80 * 2**30, 989e12, 3.35e12),
    "h200": Gpu("h200", 141 * 10**9, 989e12, 4.8e12),
    "b200": Gpu("b200", 180 * 10**9, 2.25e15, 8.0e12),
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
