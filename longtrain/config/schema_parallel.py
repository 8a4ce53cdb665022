"""Schema of the layout keys: sequence parallelism (``parallel.*``), ZeRO (``zero.*``) and memory
savings (``memory.*``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from longtrain.config.errors import require


@dataclass
class SequenceParallelConfig:
    ulysses: int = 1
    """Ulysses (all-to-all over heads) degree: must divide model.num_heads; best inside a node."""
    ring: int = 1
    """Ring-attention degree: K/V blocks pass round the ring (zigzag load balance); any head count."""
    ulysses_chunks: int = 0
    """Head chunks whose Ulysses all-to-alls overlap the other chunks' attention: 0 = auto (2 on nccl, 1 on gloo)."""

    def __post_init__(self) -> None:
        require(self.ulysses_chunks >= 0, "parallel.sp.ulysses_chunks",
                 f"must be 0 (auto) or a positive number of head chunks, got {self.ulysses_chunks}")


@dataclass
class ParallelConfig:
    sp: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    """Sequence-parallel degrees; the data-parallel degree is world size / (ulysses x ring)."""
    backend: str = "auto"
    """torch.distributed backend: `auto` (nccl on CUDA, gloo on CPU), `nccl` or `gloo`."""
    timeout_s: int = 600
    """Collective timeout in seconds: a rank that died or hangs makes the others fail with an error
    instead of waiting for ever. Must exceed the longest wait at a collective (e.g. the writing
    rank's checkpoint save)."""

    def __post_init__(self) -> None:
        require(self.backend in ("auto", "nccl", "gloo"), "parallel.backend",
                 f"must be auto, nccl or gloo, got {self.backend!r}")
        require(self.timeout_s >= 1, "parallel.timeout_s", f"must be at least 1 second, got {self.timeout_s}")


# DeepSpeed config keys longtrain derives from its own typed keys: setting them in zero.extra could
# silently break the batch layout, the gradient scaling or the schedule, so they are refused there.
ZERO_OWNED_KEYS = {
    "train_batch_size": "data.global_batch_size", "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum", "gradient_clipping": "optim.clip_grad_norm",
    "optimizer": "optim.*", "scheduler": "optim.schedule", "bf16": "trainer.precision",
    "fp16": "trainer.precision (fp16 is not supported)", "torch_autocast": "trainer.precision",
    "zero_optimization.stage": "zero.stage", "zero_optimization.offload_optimizer": "zero.offload_optimizer",
    "zero_optimization.offload_param": "zero.offload_params",
    "zero_optimization.reduce_scatter": "nothing (ZeRO-3 averages differently without it; longtrain keeps it on)",
    "zero_optimization.zero_quantized_gradients": "nothing (its all-to-all reduction averages differently)",
    "gradient_predivide_factor": "nothing (longtrain owns the gradient scaling)",
    "prescale_gradients": "nothing (longtrain owns the gradient scaling)",
    "gradient_allreduce_op": "nothing (longtrain owns the gradient scaling)",
    "sequence_parallel_size": "parallel.sp.*", "data_parallel_size": "parallel.sp.*",
    "zero_optimization.compute_grad_norm": "nothing (the gradient norm is logged and checked: trainer.nonfinite)",
}


@dataclass
class ZeroConfig:
    stage: int = 0
    """ZeRO stage over the dp x sp ranks: 0 plain data parallelism (no DeepSpeed), 1 shards the
    optimizer state, 2 also the gradients, 3 also the parameters (DeepSpeed engine for 1-3)."""
    offload_optimizer: str = "none"
    """`none` or `cpu`: keep the optimizer state and fp32 master weights in host memory and step
    them there with DeepSpeedCPUAdam (ZeRO-Offload; stages 1-3)."""
    offload_params: str = "none"
    """`none` or `cpu`: keep the sharded parameters in host memory between uses (stage 3 only)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Any other DeepSpeed config key, merged into the generated config (e.g.
    zero_optimization.reduce_bucket_size); keys longtrain derives itself are refused."""

    def __post_init__(self) -> None:
        require(self.stage in (0, 1, 2, 3), "zero.stage", f"must be 0, 1, 2 or 3, got {self.stage}")
        for key in ("offload_optimizer", "offload_params"):
            value = getattr(self, key)
            require(value in ("none", "cpu"), f"zero.{key}", f"must be none or cpu, got {value!r}")
        require(self.offload_optimizer == "none" or self.stage >= 1, "zero.offload_optimizer",
                 f"needs zero.stage 1, 2 or 3 (got stage {self.stage}); set zero.stage=2 or "
                 "zero.offload_optimizer=none")
        require(self.offload_params == "none" or self.stage == 3, "zero.offload_params",
                 f"only stage 3 shards parameters, so only stage 3 can offload them (got stage {self.stage}); "
                 "set zero.stage=3 or zero.offload_params=none")
        require(self.extra == {} or self.stage >= 1, "zero.extra",
                 "DeepSpeed keys only apply with zero.stage 1, 2 or 3")
        for dotted, owner in ZERO_OWNED_KEYS.items():
            node: Any = self.extra
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            require(node is None, f"zero.extra.{dotted}", f"is set by longtrain from {owner}; remove it from zero.extra")


@dataclass
class StreamBPConfig:
    enabled: bool = False
    """Stream every decoder layer's backward along the sequence (exact; docs/STREAMBP.md)."""
    chunk_size: Any = "auto"
    """Tokens per backward chunk, or `auto` (from the model geometry and free GPU memory; 4096 on CPU)."""

    def __post_init__(self) -> None:
        ok = self.chunk_size == "auto" or (isinstance(self.chunk_size, int) and not isinstance(self.chunk_size, bool)
                                           and self.chunk_size >= 1)
        require(ok, "memory.streambp.chunk_size", f"must be a positive number of tokens or auto, got {self.chunk_size!r}")


@dataclass
class MemoryConfig:
    checkpointing: bool = False
    """Recompute each decoder layer in the backward (activation checkpointing)."""
    streambp: StreamBPConfig = field(default_factory=StreamBPConfig)
    """StreamBP: the backward streamed in sequence chunks; excludes `checkpointing`."""
    offload_checkpoints: bool = False
    """Keep each layer's saved input in pinned host memory until the backward (needs StreamBP)."""

    def __post_init__(self) -> None:
        require(not (self.streambp.enabled and self.checkpointing), "memory.streambp.enabled",
                 "excludes memory.checkpointing (StreamBP already keeps only each layer's input); set "
                 "memory.checkpointing=false")
        require(not self.offload_checkpoints or self.streambp.enabled, "memory.offload_checkpoints",
                 "offloads the layer inputs StreamBP keeps; set memory.streambp.enabled=true as well")

