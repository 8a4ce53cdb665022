"""Geometry of a Llama-family decoder (Llama 2/3, Qwen2, Qwen3, Qwen3-MoE, Mixtral) and its size arithmetic.

:class:`ModelArgs` is the one description of a model that every other part of the project reads:
the model builds its modules from it, the trainer computes FLOPs from it, the HF converter maps it
to and from ``config.json``. User errors raise ``ValueError`` naming the ``model.<field>`` key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from longtrain.models.rope import check_rope_scaling

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_ARCHS = ("qwen3_moe", "mixtral")


def divisors(n: int) -> list:
    """The positive divisors of ``n``, ascending (named in the messages for values that must divide)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"model.{key}: {msg}")


@dataclass
class ModelArgs:
    vocab_size: int
    """Vocabulary size (rows of the embedding and of the LM head)."""
    hidden_size: int
    """Model width."""
    intermediate_size: int
    """Inner width of the SwiGLU MLP."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: Optional[int] = None
    """Number of key/value heads (grouped-query attention when smaller); None means num_heads."""
    head_dim: Optional[int] = None
    """Per-head dimension; None means hidden_size // num_heads (resolved in __post_init__)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Optional[dict] = None
    """RoPE scaling as in HF's rope_scaling: {rope_type: linear | yarn | llama3, factor, ...}
    (:mod:`longtrain.models.rope`); None means plain RoPE."""
    max_position_embeddings: int = 8192
    """Longest position the model is meant for."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding and the LM head weight."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3)."""
    init_std: float = 0.02
    """Standard deviation of the random initialisation."""
    arch: str = "llama"
    """Architecture family written as the HF model_type on export: llama, qwen2, qwen3, qwen3_moe, mixtral."""
    num_experts: int = 0
    """Routed experts per MoE layer (``model.moe.num_experts``); 0 means a dense model."""
    top_k: int = 2
    """Experts each token is routed to (``model.moe.top_k``)."""
    num_shared_experts: int = 0
    """Always-on experts added unweighted to the routed ones (``model.moe.num_shared_experts``)."""
    moe_intermediate_size: Optional[int] = None
    """Inner width of one routed expert; None means intermediate_size."""
    shared_intermediate_size: Optional[int] = None
    """Inner width of the shared experts taken together (one SwiGLU); None means
    num_shared_experts * moe_intermediate_size."""
    norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities to sum to 1 (Mixtral: always; Qwen3-MoE: configurable)."""
    capacity_factor: Optional[float] = None
    """Expert capacity as a multiple of the even share ``tokens * top_k / num_experts``; assignments past
    it are dropped (the token keeps its residual). None: no token is ever dropped."""
    moe_layer_step: int = 1
    """Layer i is MoE when (i + 1) % moe_layer_step == 0 (HF Qwen3-MoE's decoder_sparse_step)."""
    dense_layers: Tuple[int, ...] = ()
    """Layer indices that keep the dense MLP of width intermediate_size (HF Qwen3-MoE's mlp_only_layers)."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, key, f"must be a positive integer, got {value!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _require(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"must divide model.num_heads={self.num_heads}, got {self.num_kv_heads}; valid values: "
                 f"{', '.join(map(str, divisors(self.num_heads)))} (or change model.num_heads)")
        if self.head_dim is None:
            _require(self.hidden_size % self.num_heads == 0, "head_dim",
                     f"is null but model.hidden_size={self.hidden_size} is not a multiple of model.num_heads="
                     f"{self.num_heads}; set model.num_heads to a divisor of {self.hidden_size} "
                     f"({', '.join(map(str, divisors(self.hidden_size)[:12]))}, ...) or set model.head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        _require(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                 f"must be an even positive integer (RoPE rotates pairs), got {self.head_dim}")
        _require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        _require(self.max_position_embeddings >= 1, "max_position_embeddings",
                 f"must be positive, got {self.max_position_embeddings}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        _require(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        _require(self.arch in ARCHS, "arch", f"must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        self.rope_scaling = check_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self._check_moe()

    def _check_moe(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        _require(is_int(self.num_experts) and self.num_experts >= 0, "moe.num_experts",
                 f"must be a non-negative integer (0 = dense), got {self.num_experts!r}")
        _require(is_int(self.num_shared_experts) and self.num_shared_experts >= 0, "moe.num_shared_experts",
                 f"must be a non-negative integer, got {self.num_shared_experts!r}")
        self.dense_layers = tuple(self.dense_layers)
        if not self.num_experts:
            return
        _require(is_int(self.top_k) and 1 <= self.top_k <= self.num_experts, "moe.top_k",
                 f"must be between 1 and model.moe.num_experts={self.num_experts}, got {self.top_k!r}")
        _require(is_int(self.expert_size) and self.expert_size >= 1, "moe_intermediate_size",
                 f"must be a positive integer or null, got {self.moe_intermediate_size!r}")
        _require(self.num_shared_experts == 0 or (is_int(self.shared_size) and self.shared_size >= 1),
                 "shared_intermediate_size",
                 f"must be a positive integer or null, got {self.shared_intermediate_size!r}")
        _require(self.capacity_factor is None or self.capacity_factor > 0, "moe.capacity_factor",
                 f"must be positive or null (no token dropping), got {self.capacity_factor!r}")
        _require(is_int(self.moe_layer_step) and self.moe_layer_step >= 1, "moe_layer_step",
                 f"must be a positive integer, got {self.moe_layer_step!r}")
        bad = [i for i in self.dense_layers if not is_int(i) or not 0 <= i < self.num_layers]
        _require(not bad, "dense_layers", f"indices must lie in [0, {self.num_layers}), got {bad}")

    @property
    def expert_size(self) -> int:
        """Inner width of one routed expert (moe_intermediate_size, else intermediate_size)."""
        return self.intermediate_size if self.moe_intermediate_size is None else self.moe_intermediate_size

    @property
    def shared_size(self) -> int:
        """Inner width of the shared experts together (0 without them)."""
        if self.shared_intermediate_size is not None and self.num_shared_experts:
            return self.shared_intermediate_size
        return self.num_shared_experts * self.expert_size

    @property
    def moe_layers(self) -> Tuple[int, ...]:
        """Indices of the layers whose MLP is a mixture of experts (none for a dense model)."""
        if not self.num_experts:
            return ()
        return tuple(i for i in range(self.num_layers)
                     if i not in self.dense_layers and (i + 1) % self.moe_layer_step == 0)

    @property
    def head_groups(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads

    def _mlp_params(self, layer: int, active: bool) -> int:
        h = self.hidden_size
        if layer not in self.moe_layers:
            return 3 * h * self.intermediate_size
        experts = self.top_k if active else self.num_experts
        return h * self.num_experts + 3 * h * (experts * self.expert_size + self.shared_size)

    def num_params(self, exclude_embedding: bool = False, active: bool = False) -> int:
        """Number of distinct parameters of :class:`~longtrain.models.Transformer`.

        Args:
            exclude_embedding: leave out both vocabulary matrices (input embedding and LM head),
                i.e. count the "non-embedding" parameters of scaling-law papers.
            active: count only the parameters one token uses (top_k of the routed experts of each
                MoE layer, plus the router and shared experts); equals the total for a dense model.

        Returns:
            The count; a tied LM head is counted once (with the embedding).
        """
        h, d = self.hidden_size, self.head_dim
        q_dim, kv_dim = self.num_heads * d, self.num_kv_heads * d
        attn = h * q_dim + 2 * h * kv_dim + q_dim * h
        attn += (q_dim + 2 * kv_dim) if self.qkv_bias else 0
        attn += 2 * d if self.qk_norm else 0
        body = self.num_layers * (attn + 2 * h) + h  # + layer norms, final norm
        body += sum(self._mlp_params(i, active=active) for i in range(self.num_layers))
        if exclude_embedding:
            return body
        vocab = self.vocab_size * h
        return body + vocab * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        ``6 * (N + V*h) + 6 * L * H * D * S``: each weight of a matmul costs 2 FLOPs per token
        forward and 4 backward (N = active non-embedding parameters; the LM head V*h is a matmul even when
        tied, the input embedding is a lookup). Attention scores and the weighted sum cost
        ``2 * 2 * H * D * S`` per token and layer forward, times 3 with the backward, i.e.
        ``12 * L * H * D * S``; a causal mask halves it to ``6 * L * H * D * S``.

        Args:
            seq_len: tokens per sequence (documents packed in it are counted as one sequence).

        Returns:
            FLOPs per token, for MFU accounting.
        """
        dense = 6 * (self.num_params(exclude_embedding=True, active=True) + self.vocab_size * self.hidden_size)
        attention = 6 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return float(dense + attention)
