"""Schema of the model keys (``model.*``, with its ``model.moe.*`` group).

Every key is optional: null keeps the value of the size registry entry (``model.name``) or of the
Hugging Face directory (``model.hf_path``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from longtrain.config.errors import require


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
    init_from: Optional[str] = None
    """A longtrain checkpoint (or run directory: its newest) whose model weights start this run, with a fresh
    optimizer and step count; the geometry must match the checkpoint's, except rope_scaling and
    max_position_embeddings (e.g. to extend a trained model's context; recipes/tiny_sp.yaml)."""
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
    rope_scaling: Dict[str, Any] = field(default_factory=dict)
    """RoPE scaling as in HF's rope_scaling, e.g. {rope_type: yarn, factor: 4, original_max_position_embeddings: 2048}
    (types linear, yarn, llama3: longtrain/models/rope.py; {rope_type: default} removes it); empty keeps the
    registry's value (none for tiny)."""
    max_position_embeddings: Optional[int] = None
    """Longest position the model is meant for (used by Llama-3 RoPE scaling)."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding and the LM head weight."""
    init_std: Optional[float] = None
    """Standard deviation of the random initialisation."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts keys (null keeps the registry's value)."""

    def __post_init__(self) -> None:
        require(self.hf_path is None or self.init_from is None, "model.init_from",
                "give either model.hf_path (Hugging Face weights) or model.init_from (a longtrain checkpoint), not both")
