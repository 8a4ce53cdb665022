"""Schema of the training keys: the run (``run.*``), optimizer (``optim.*``), loop (``trainer.*``),
logging (``logging.*``), checkpoints (``checkpoint.*``) and MoE training losses (``moe.*``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from longtrain.config.errors import require


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config, metrics, checkpoints and plots go here. launch/run.sh computes it once."""
    name: Optional[str] = None
    """Human-readable run name (W&B run name); defaults to the run directory's base name."""



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
        require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.schedule in ("cosine", "wsd", "constant"), "optim.schedule",
                 f"must be cosine, wsd or constant, got {self.schedule!r}")
        require(str(self.fused).lower() in ("auto", "true", "false"), "optim.fused",
                 f"must be auto, true or false, got {self.fused!r}")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            require(0 <= value < 1, f"optim.{key}", f"must be in [0, 1), got {value}")
        require(self.eps >= 0, "optim.eps", f"must be >= 0, got {self.eps}")
        require(0 < self.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        require(self.clip_grad_norm >= 0, "optim.clip_grad_norm", f"must be >= 0, got {self.clip_grad_norm}")


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
    fp32_residual: bool = False
    """Under bf16 autocast, keep the residual stream (each layer's input and output) in fp32;
    false keeps it in bf16 (Megatron's default, and what DeepSpeed's bf16 weights give), which
    halves what checkpointing and StreamBP keep per layer and token."""
    attention_backend: str = "auto"
    """The attention kernels of every caller on CUDA (local, Ulysses, ring blocks, StreamBP chunks):
    `flash` (flash attention's varlen ops), `cudnn` (SDPA's cuDNN ops for dense blocks, flash for
    packed documents) or `auto` (cuDNN where a timing probe on each block shape finds it faster).
    CPU runs ignore it."""
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
        require(self.max_steps >= 1, "trainer.max_steps", f"must be at least 1, got {self.max_steps}")
        require(self.seed >= 0, "trainer.seed", f"must be >= 0, got {self.seed}")
        require(self.grad_accum is None or self.grad_accum >= 1, "trainer.grad_accum",
                 f"must be null or at least 1, got {self.grad_accum}")
        require(self.device in ("auto", "cpu", "cuda"), "trainer.device",
                 f"must be auto, cpu or cuda, got {self.device!r}")
        require(self.precision in ("auto", "bf16", "fp32"), "trainer.precision",
                 f"must be auto, bf16 or fp32, got {self.precision!r}")
        require(self.attention_backend in ("auto", "flash", "cudnn"), "trainer.attention_backend",
                 f"must be auto, flash or cudnn, got {self.attention_backend!r}")
        require(self.eval_every >= 0, "trainer.eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.eval_rows >= 0, "trainer.eval_rows", f"must be >= 0, got {self.eval_rows}")
        require(0 <= self.stop_at_step, "trainer.stop_at_step", f"must be >= 0, got {self.stop_at_step}")
        require(self.loss_chunk_size >= 1, "trainer.loss_chunk_size",
                 f"must be at least 1, got {self.loss_chunk_size}")
        require(self.nonfinite in ("stop", "skip"), "trainer.nonfinite",
                 f"must be stop or skip, got {self.nonfinite!r}")
        require(self.max_skipped_steps >= 1, "trainer.max_skipped_steps",
                 f"must be at least 1, got {self.max_skipped_steps}")



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
        require(self.mode in ("disabled", "offline", "online"), "logging.wandb.mode",
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
        require(self.log_every >= 1, "logging.log_every", f"must be at least 1, got {self.log_every}")
        require(self.expert_frac_every >= 0, "logging.expert_frac_every",
                 f"must be >= 0 (0: never), got {self.expert_frac_every}")
        require(self.peak_tflops is None or self.peak_tflops > 0, "logging.peak_tflops",
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
        require(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        require(self.keep >= 1, "checkpoint.keep", f"must be at least 1, got {self.keep}")


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
        require(self.scope in ("micro_batch", "sequence", "global"), "moe.balance.scope",
                 f"must be micro_batch, sequence or global, got {self.scope!r}")
        require(self.coef >= 0, "moe.balance.coef", f"must be >= 0, got {self.coef}")
        require(self.bias_update_rate >= 0, "moe.balance.bias_update_rate",
                 f"must be >= 0, got {self.bias_update_rate}")


@dataclass
class MoETrainConfig:
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    """Load balancing of the routed experts."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss, the mean over tokens of logsumexp(router logits)^2 (averaged
    over MoE layers); 0 turns it off."""

    def __post_init__(self) -> None:
        require(self.z_loss_coef >= 0, "moe.z_loss_coef", f"must be >= 0, got {self.z_loss_coef}")

