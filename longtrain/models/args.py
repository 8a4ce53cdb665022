"""Geometry of a Llama-family decoder (Llama 2/3, Qwen2, Qwen3) and its size arithmetic.

:class:`ModelArgs` is the one description of a model that every other part of the project reads:
the model builds its modules from it, the trainer computes FLOPs from it, the HF converter maps it
to and from ``config.json``. User errors raise ``ValueError`` naming the ``model.<field>`` key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ARCHS = ("llama", "qwen2", "qwen3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


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
    """Llama-3 RoPE scaling: {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}; None means plain RoPE."""
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
    """Architecture family written as the HF model_type on export: llama, qwen2 or qwen3."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, key, f"must be a positive integer, got {value!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _require(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.head_dim is None:
            _require(self.hidden_size % self.num_heads == 0, "head_dim",
                     f"is null but hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}; "
                     "set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        _require(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                 f"must be an even positive integer (RoPE rotates pairs), got {self.head_dim}")
        _require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        _require(self.max_position_embeddings >= 1, "max_position_embeddings",
                 f"must be positive, got {self.max_position_embeddings}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        _require(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        _require(self.arch in ARCHS, "arch", f"must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        rs = self.rope_scaling
        _require(isinstance(rs, dict), "rope_scaling", f"must be null or a mapping, got {rs!r}")
        rope_type = rs.get("rope_type", rs.get("type"))
        _require(rope_type == "llama3", "rope_scaling",
                 f"only rope_type 'llama3' is supported, got {rope_type!r}; set model.rope_scaling to null or llama3")
        missing = [k for k in _LLAMA3_ROPE_KEYS if rs.get(k) is None]
        _require(not missing, "rope_scaling", f"llama3 scaling needs {', '.join(missing)}")
        _require(rs["factor"] >= 1, "rope_scaling", f"factor must be >= 1, got {rs['factor']}")
        _require(rs["high_freq_factor"] > rs["low_freq_factor"], "rope_scaling",
                 "high_freq_factor must be greater than low_freq_factor")
        self.rope_scaling = {"rope_type": "llama3", **{k: rs[k] for k in _LLAMA3_ROPE_KEYS}}

    @property
    def head_groups(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of distinct parameters of :class:`~longtrain.models.Transformer`.

        Args:
            exclude_embedding: leave out both vocabulary matrices (input embedding and LM head),
                i.e. count the "non-embedding" parameters of scaling-law papers.

        Returns:
            The count; a tied LM head is counted once (with the embedding).
        """
        h, d = self.hidden_size, self.head_dim
        q_dim, kv_dim = self.num_heads * d, self.num_kv_heads * d
        attn = h * q_dim + 2 * h * kv_dim + q_dim * h
        attn += (q_dim + 2 * kv_dim) if self.qkv_bias else 0
        attn += 2 * d if self.qk_norm else 0
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        body = self.num_layers * layer + h  # + final norm
        if exclude_embedding:
            return body
        vocab = self.vocab_size * h
        return body + vocab * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        ``6 * (N + V*h) + 6 * L * H * D * S``: each weight of a matmul costs 2 FLOPs per token
        forward and 4 backward (N = non-embedding parameters; the LM head V*h is a matmul even when
        tied, the input embedding is a lookup). Attention scores and the weighted sum cost
        ``2 * 2 * H * D * S`` per token and layer forward, times 3 with the backward, i.e.
        ``12 * L * H * D * S``; a causal mask halves it to ``6 * L * H * D * S``.

        Args:
            seq_len: tokens per sequence (documents packed in it are counted as one sequence).

        Returns:
            FLOPs per token, for MFU accounting.
        """
        dense = 6 * (self.num_params(exclude_embedding=True) + self.vocab_size * self.hidden_size)
        attention = 6 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return float(dense + attention)
