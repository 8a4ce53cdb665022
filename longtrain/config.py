"""Typed configuration schema, registered in Hydra's ConfigStore.

YAML recipes in ``recipes/`` only give values; this module defines every key, its type, its
default and what it means. The entry point converts the composed config once with
``OmegaConf.to_object`` (which runs each ``__post_init__`` check) and hands typed sub-configs
down: nothing below ``longtrain.train`` sees a ``DictConfig``.

User errors raise :class:`ConfigError` (a ``ValueError``) naming the key and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from longtrain.trainer.domains import DOMAIN_NAMES, domain_probabilities


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config, metrics, checkpoints and plots go here. launch/run.sh computes it once."""
    name: Optional[str] = None
    """Human-readable run name (W&B run name); defaults to the run directory's base name."""


@dataclass
class MoEConfig:
    num_experts: Optional[int] = None
    """Routed experts per MoE layer; 0 makes the model dense; null keeps the registry's value."""
    top_k: Optional[int] = None
    """Experts each token is routed to."""
    num_shared_experts: Optional[int] = None
    """Always-on experts whose output is added to the routed ones."""
    capacity_factor: Optional[float] = None
    """Drop assignments past capacity_factor x the even share per expert; null never drops."""

    def model_args(self) -> Dict[str, Any]:
        """The ModelArgs fields these keys set (the unset ones left out)."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Entry of the size registry (longtrain.models.registry): tiny, llama1b, llama8b, qwen3_0_6b, ..."""
    hf_path: Optional[str] = None
    """Local Hugging Face directory to initialise weights and geometry from (overrides `name`)."""
    vocab_size: Optional[int] = None
    """Vocabulary size; null keeps the registry's value (must cover the tokenizer's ids)."""
    hidden_size: Optional[int] = None
    """Model width."""
    intermediate_size: Optional[int] = None
    """SwiGLU inner width."""
    num_layers: Optional[int] = None
    """Number of decoder layers."""
    num_heads: Optional[int] = None
    """Number of query heads."""
    num_kv_heads: Optional[int] = None
    """Number of key/value heads (grouped-query attention when smaller than num_heads)."""
    head_dim: Optional[int] = None
    """Per-head dimension; null means hidden_size // num_heads."""
    rope_theta: Optional[float] = None
    """RoPE base frequency."""
    max_position_embeddings: Optional[int] = None
    """Longest position the model is meant for (used by Llama-3 RoPE scaling)."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding and the LM head weight."""
    init_std: Optional[float] = None
    """Standard deviation of the random initialisation."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts keys (null keeps the registry's value)."""


@dataclass
class PasskeyConfig:
    num_train: int = 512
    """Number of synthetic training documents."""
    num_eval: int = 64
    """Number of synthetic evaluation documents (each evaluated for passkey accuracy)."""
    min_chars: int = 256
    """Shortest document, in characters of filler text."""
    max_chars: int = 1024
    """Longest document, in characters of filler text."""
    digits: int = 5
    """Number of digits of the passkey."""


@dataclass
class DomainsConfig:
    num_train: int = 2048
    """Number of synthetic training documents."""
    num_eval: int = 128
    """Number of synthetic evaluation documents."""
    min_chars: int = 128
    """Shortest document, in characters (rounded up to a whole line or sentence)."""
    max_chars: int = 512
    """Longest document, in characters (rounded up to a whole line or sentence)."""
    names: List[str] = field(default_factory=lambda: list(DOMAIN_NAMES))
    """Domains to draw documents from: any of arithmetic, code, dna, prose."""
    mix: Optional[List[float]] = None
    """One weight per entry of names (the chance a document is from that domain); null is uniform."""

    def __post_init__(self) -> None:
        _require(0 < self.min_chars <= self.max_chars, "data.domains.min_chars",
                 f"need 0 < min_chars <= max_chars, got {self.min_chars} and {self.max_chars}")
        _require(self.num_train >= 1 and self.num_eval >= 0, "data.domains.num_train",
                 "num_train must be >= 1 and num_eval >= 0")
        try:
            domain_probabilities(self.names, self.mix)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class DataConfig:
    source: str = "passkey"
    """`passkey` or `domains` (the embedded synthetic datasets), or a local jsonl/json/parquet/txt
    file, a folder of such files, or a folder written by datasets' save_to_disk."""
    eval_source: Optional[str] = None
    """Evaluation data in the same forms; null uses the passkey or domains eval split, or no eval data."""
    tokenizer: str = "byte"
    """`byte` (byte-level, no files needed) or a local Hugging Face tokenizer directory."""
    mode: str = "pretrain"
    """`pretrain` (loss on every token) or `sft` (loss on responses only)."""
    text_field: str = "text"
    """Field holding the document text in pretrain mode."""
    domain_field: Optional[str] = None
    """Field holding each record's domain name (text), carried to every token of the packed data;
    null means no domains, or `domain` when data.source or data.eval_source is `domains`."""
    seq_len: int = 1024
    """Tokens per packed training sequence."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks and accumulation steps; null means
    micro_batch_size * grad_accum * data-parallel degree. Fixing it makes runs with different
    layouts see the same tokens at every step."""
    overlong: str = "split"
    """What to do with documents longer than seq_len: `split` into seq_len pieces or `drop`."""
    add_bos: bool = True
    """Prepend the tokenizer's BOS token to each document (when it has one)."""
    add_eos: bool = True
    """Append the tokenizer's EOS token to each document (when it has one)."""
    cache_dir: Optional[str] = None
    """Cache for tokenised and packed data; null means ~/.cache/longtrain."""
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    """Settings of the embedded passkey dataset."""
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    """Settings of the embedded mixed-domain dataset."""

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, "data.seq_len", f"must be at least 2, got {self.seq_len}")
        _require(self.micro_batch_size >= 1, "data.micro_batch_size",
                 f"must be at least 1, got {self.micro_batch_size}")
        _require(self.global_batch_size is None or self.global_batch_size >= 1, "data.global_batch_size",
                 f"must be null or at least 1, got {self.global_batch_size}")
        _require(self.mode in ("pretrain", "sft"), "data.mode", f"must be pretrain or sft, got {self.mode!r}")
        _require(self.overlong in ("split", "drop"), "data.overlong",
                 f"must be split or drop, got {self.overlong!r}")
        pk = self.passkey
        _require(0 < pk.min_chars <= pk.max_chars, "data.passkey.min_chars",
                 f"need 0 < min_chars <= max_chars, got {pk.min_chars} and {pk.max_chars}")
        _require(pk.num_train >= 1 and pk.num_eval >= 0, "data.passkey.num_train",
                 "num_train must be >= 1 and num_eval >= 0")
        _require(1 <= pk.digits <= 18, "data.passkey.digits", f"must be in 1..18, got {pk.digits}")
        used = {self.source, self.eval_source or self.source}  # a null eval_source means the source's eval split
        if "domains" in used:
            _require(self.domain_field in (None, "domain"), "data.domain_field",
                     f"the domains source labels records in the field 'domain', got {self.domain_field!r}; "
                     "set data.domain_field=null")
            _require(self.mode == "pretrain", "data.mode",
                     "the domains source is pretraining text; set data.mode=pretrain")
        _require("passkey" not in used or (self.domain_field is None and "domains" not in used),
                 "data.source" if self.source == "passkey" else "data.eval_source",
                 "passkey records carry no domain, but domains are used (data.domain_field or the domains source); "
                 "use another source here, or set data.domain_field=null and use no domains source")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine end, or WSD decay end)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms, biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    fused: str = "auto"
    """`auto` (fused kernel on CUDA, foreach elsewhere), `true` or `false`."""
    schedule: str = "cosine"
    """`cosine` (warmup then cosine decay), `wsd` (warmup, stable, decay) or `constant`."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """WSD only: fraction of max_steps spent in the final decay."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.schedule in ("cosine", "wsd", "constant"), "optim.schedule",
                 f"must be cosine, wsd or constant, got {self.schedule!r}")
        _require(str(self.fused).lower() in ("auto", "true", "false"), "optim.fused",
                 f"must be auto, true or false, got {self.fused!r}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"optim.{key}", f"must be in [0, 1), got {value}")
        _require(self.eps >= 0, "optim.eps", f"must be >= 0, got {self.eps}")
        _require(0 < self.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        _require(self.clip_grad_norm >= 0, "optim.clip_grad_norm", f"must be >= 0, got {self.clip_grad_norm}")


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps to train for."""
    seed: int = 0
    """Seed of model initialisation and of the data order."""
    grad_accum: Optional[int] = None
    """Micro-batches accumulated per optimizer step on each rank; null derives it from
    data.global_batch_size / (data.micro_batch_size x data-parallel degree), or 1 without one."""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu` or `cuda`."""
    precision: str = "auto"
    """`auto` (bf16 autocast on CUDA, fp32 on CPU), `bf16` or `fp32`. Master weights stay fp32."""
    eval_every: int = 0
    """Evaluate every N steps (and at the end); 0 disables evaluation."""
    eval_rows: int = 64
    """Sequences per evaluation, split over the data-parallel ranks (0: the whole eval set)."""
    loss_chunk_size: int = 4096
    """Tokens per chunk of the LM head + loss; the full logits tensor is never materialised."""
    stop_at_step: int = 0
    """Stop (with a checkpoint) after this step, as a preempted job would; the schedule still runs to
    max_steps. 0 runs to max_steps. Used to split a long run over several jobs."""
    nonfinite: str = "stop"
    """What a non-finite loss or gradient norm does, checked before the weights change: `stop` (an
    error naming the step) or `skip` (gradients dropped, no update, the schedule and data move on)."""
    max_skipped_steps: int = 10
    """With nonfinite=skip: stop with an error once this many steps in a row were skipped."""

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, "trainer.max_steps", f"must be at least 1, got {self.max_steps}")
        _require(self.seed >= 0, "trainer.seed", f"must be >= 0, got {self.seed}")
        _require(self.grad_accum is None or self.grad_accum >= 1, "trainer.grad_accum",
                 f"must be null or at least 1, got {self.grad_accum}")
        _require(self.device in ("auto", "cpu", "cuda"), "trainer.device",
                 f"must be auto, cpu or cuda, got {self.device!r}")
        _require(self.precision in ("auto", "bf16", "fp32"), "trainer.precision",
                 f"must be auto, bf16 or fp32, got {self.precision!r}")
        _require(self.eval_every >= 0, "trainer.eval_every", f"must be >= 0, got {self.eval_every}")
        _require(self.eval_rows >= 0, "trainer.eval_rows", f"must be >= 0, got {self.eval_rows}")
        _require(0 <= self.stop_at_step, "trainer.stop_at_step", f"must be >= 0, got {self.stop_at_step}")
        _require(self.loss_chunk_size >= 1, "trainer.loss_chunk_size",
                 f"must be at least 1, got {self.loss_chunk_size}")
        _require(self.nonfinite in ("stop", "skip"), "trainer.nonfinite",
                 f"must be stop or skip, got {self.nonfinite!r}")
        _require(self.max_skipped_steps >= 1, "trainer.max_skipped_steps",
                 f"must be at least 1, got {self.max_skipped_steps}")


@dataclass
class SequenceParallelConfig:
    ulysses: int = 1
    """Ulysses (all-to-all over heads) degree: must divide model.num_heads; best inside a node."""
    ring: int = 1
    """Ring-attention degree: K/V blocks pass round the ring (zigzag load balance); any head count."""
    ulysses_chunks: int = 0
    """Head chunks whose Ulysses all-to-alls overlap the other chunks' attention: 0 = auto (2 on nccl, 1 on gloo)."""

    def __post_init__(self) -> None:
        _require(self.ulysses_chunks >= 0, "parallel.sp.ulysses_chunks",
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
        _require(self.backend in ("auto", "nccl", "gloo"), "parallel.backend",
                 f"must be auto, nccl or gloo, got {self.backend!r}")
        _require(self.timeout_s >= 1, "parallel.timeout_s", f"must be at least 1 second, got {self.timeout_s}")


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
        _require(self.stage in (0, 1, 2, 3), "zero.stage", f"must be 0, 1, 2 or 3, got {self.stage}")
        for key in ("offload_optimizer", "offload_params"):
            value = getattr(self, key)
            _require(value in ("none", "cpu"), f"zero.{key}", f"must be none or cpu, got {value!r}")
        _require(self.offload_optimizer == "none" or self.stage >= 1, "zero.offload_optimizer",
                 f"needs zero.stage 1, 2 or 3 (got stage {self.stage}); set zero.stage=2 or "
                 "zero.offload_optimizer=none")
        _require(self.offload_params == "none" or self.stage == 3, "zero.offload_params",
                 f"only stage 3 shards parameters, so only stage 3 can offload them (got stage {self.stage}); "
                 "set zero.stage=3 or zero.offload_params=none")
        _require(self.extra == {} or self.stage >= 1, "zero.extra",
                 "DeepSpeed keys only apply with zero.stage 1, 2 or 3")
        for dotted, owner in ZERO_OWNED_KEYS.items():
            node: Any = self.extra
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            _require(node is None, f"zero.extra.{dotted}", f"is set by longtrain from {owner}; remove it from zero.extra")


@dataclass
class StreamBPConfig:
    enabled: bool = False
    """Stream every decoder layer's backward along the sequence (exact; docs/STREAMBP.md)."""
    chunk_size: Any = "auto"
    """Tokens per backward chunk, or `auto` (from the model geometry and free GPU memory; 4096 on CPU)."""

    def __post_init__(self) -> None:
        ok = self.chunk_size == "auto" or (isinstance(self.chunk_size, int) and not isinstance(self.chunk_size, bool)
                                           and self.chunk_size >= 1)
        _require(ok, "memory.streambp.chunk_size", f"must be a positive number of tokens or auto, got {self.chunk_size!r}")


@dataclass
class MemoryConfig:
    checkpointing: bool = False
    """Recompute each decoder layer in the backward (activation checkpointing)."""
    streambp: StreamBPConfig = field(default_factory=StreamBPConfig)
    """StreamBP: the backward streamed in sequence chunks; excludes `checkpointing`."""
    offload_checkpoints: bool = False
    """Keep each layer's saved input in pinned host memory until the backward (needs StreamBP)."""

    def __post_init__(self) -> None:
        _require(not (self.streambp.enabled and self.checkpointing), "memory.streambp.enabled",
                 "excludes memory.checkpointing (StreamBP already keeps only each layer's input); set "
                 "memory.checkpointing=false")
        _require(not self.offload_checkpoints or self.streambp.enabled, "memory.offload_checkpoints",
                 "offloads the layer inputs StreamBP keeps; set memory.streambp.enabled=true as well")


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """`disabled`, `offline` (no network needed; sync later) or `online`."""
    project: str = "longtrain"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); null uses the default."""
    group: Optional[str] = None
    """W&B group."""
    tags: List[str] = field(default_factory=list)
    """W&B tags."""

    def __post_init__(self) -> None:
        _require(self.mode in ("disabled", "offline", "online"), "logging.wandb.mode",
                 f"must be disabled, offline or online, got {self.mode!r}")


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Write metrics every N steps."""
    progress: bool = True
    """Show a progress bar on the writing rank."""
    peak_tflops: Optional[float] = None
    """Peak dense bf16 TFLOP/s of one device for MFU; null detects known GPUs (MFU null on CPU)."""
    expert_frac_every: int = 50
    """MoE models: also log each layer's per-expert load shares (moe/layer{i}/expert_frac, one list
    per layer) every N steps (and at the first step); 0 never. The scalar moe/* metrics go with
    every logged step."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases tracking."""

    def __post_init__(self) -> None:
        _require(self.log_every >= 1, "logging.log_every", f"must be at least 1, got {self.log_every}")
        _require(self.expert_frac_every >= 0, "logging.expert_frac_every",
                 f"must be >= 0 (0: never), got {self.expert_frac_every}")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "logging.peak_tflops",
                 f"must be null (detect) or positive, got {self.peak_tflops}")


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps (and always at the end); 0 saves only at the end."""
    keep: int = 3
    """Keep the last K checkpoints; older ones are deleted after a successful save."""
    resume: str = "auto"
    """`auto` (the latest complete and intact checkpoint of run.dir, damaged newer ones skipped with
    a warning, or a fresh start if there is none), `none` (fresh start; refused when run.dir already
    holds checkpoints), or a checkpoint or run directory. The chosen checkpoint's sha256 are checked."""
    save_final: bool = True
    """Save a checkpoint at the end of the run."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        _require(self.keep >= 1, "checkpoint.keep", f"must be at least 1, got {self.keep}")


@dataclass
class BalanceConfig:
    scope: str = "global"
    """Tokens the load-balancing loss counts expert loads over: `micro_batch` (this rank's
    micro-batch, whole sequences), `sequence` (each sequence alone) or `global` (the whole step:
    counts summed over data x sequence parallel ranks and, as running totals, over the step's
    accumulation micro-batches). See docs/MOE.md."""
    coef: float = 0.001
    """Weight of the load-balancing loss E * sum_i f_i p_i (averaged over MoE layers); 0 turns the
    loss off (its value is still logged)."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each step every expert's routing bias
    moves by this much towards balance (down if overloaded over the global batch, up if not);
    the bias changes which experts are chosen, never their weights. 0 turns it off."""

    def __post_init__(self) -> None:
        _require(self.scope in ("micro_batch", "sequence", "global"), "moe.balance.scope",
                 f"must be micro_batch, sequence or global, got {self.scope!r}")
        _require(self.coef >= 0, "moe.balance.coef", f"must be >= 0, got {self.coef}")
        _require(self.bias_update_rate >= 0, "moe.balance.bias_update_rate",
                 f"must be >= 0, got {self.bias_update_rate}")


@dataclass
class MoETrainConfig:
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    """Load balancing of the routed experts."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss, the mean over tokens of logsumexp(router logits)^2 (averaged
    over MoE layers); 0 turns it off."""

    def __post_init__(self) -> None:
        _require(self.z_loss_coef >= 0, "moe.z_loss_coef", f"must be >= 0, got {self.z_loss_coef}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)

    def __post_init__(self) -> None:
        _require(not (self.memory.streambp.enabled and self.zero.stage == 3 and self.parallel.sp.ring > 1),
                 "memory.streambp.enabled", f"with zero.stage=3 needs local or Ulysses attention, not "
                 f"parallel.sp.ring={self.parallel.sp.ring}: ring and hybrid layouts recompute attention whole "
                 "through ZeRO-3's module hooks; use zero.stage 1 or 2 there")


def register_configs() -> None:
    """Register the schema as ``longtrain_schema`` so recipes can list it in their defaults."""
    ConfigStore.instance().store(name="longtrain_schema", node=Config)
