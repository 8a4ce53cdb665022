"""Llama-family causal decoder (Llama 2/3, Qwen2, Qwen3; Qwen3-MoE and Mixtral with
:mod:`longtrain.models.moe` blocks) for long-sequence training.

Parameter names are exactly those of Hugging Face's ``*ForCausalLM`` (``model.layers.0.self_attn.
q_proj.weight``, ``lm_head.weight``, ...) and RoPE uses the same rotate-half convention, so HF
checkpoints load by a plain copy (see :mod:`longtrain.models.hf`).

Attention is delegated to ``self_attn.attn_fn`` (default
:data:`longtrain.kernels.attention.local_attention`), a plain attribute that sequence-parallel
code swaps with :meth:`Transformer.set_attention_fn`. Activation checkpointing and StreamBP wrap
each decoder layer from outside (:mod:`longtrain.memory.wrappers`). Packed documents travel as
``doc_ids`` and per-document ``position_ids``; a shard of a sequence passes its true (global)
positions.

Layout legend: x_bsh [batch, seq, hidden]; q_bshd/k_bshd/v_bshd [batch, seq, heads, head_dim];
cos_bsd/sin_bsd [batch, seq, head_dim]; position_ids_bs/doc_ids_bs [batch, seq].
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longtrain.models.args import ModelArgs
from longtrain.models.moe import Experts, MoE
from longtrain.models.rope import rope_frequencies
from longtrain.kernels.attention import local_attention

AttentionFn = Callable[..., torch.Tensor]

NORM_CHUNK = 8192
"""Tokens per chunk of the final norm's backward (:meth:`Transformer._final_norm`)."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_bshd: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor) -> torch.Tensor:
    """Rotate ``x_bshd`` by the angles of ``cos_bsd``/``sin_bsd`` (HF rotate-half pairing i, i + D/2)."""
    cos, sin = cos_bsd.unsqueeze(2), sin_bsd.unsqueeze(2)
    return x_bshd * cos + _rotate_half(x_bshd) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        h, q_dim, kv_dim = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = nn.Linear(h, q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_dim, h, bias=False)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.scale = args.head_dim ** -0.5
        self.attn_fn: AttentionFn = local_attention

    def forward(self, x_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
                doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, _ = x_bsh.shape
        q_bshd = self.q_proj(x_bsh).view(b, s, self.num_heads, self.head_dim)
        k_bshd = self.k_proj(x_bsh).view(b, s, self.num_kv_heads, self.head_dim)
        v_bshd = self.v_proj(x_bsh).view(b, s, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            # autocast runs the norms in fp32; the attention kernels take q and k in v's precision
            # (flash and cuDNN take half precision only: fp32 queries would fall to SDPA per document
            # and to the reference block kernels), as attention under autocast casts them in HF
            q_bshd, k_bshd = self.q_norm(q_bshd).to(v_bshd.dtype), self.k_norm(k_bshd).to(v_bshd.dtype)
        q_bshd = apply_rope(q_bshd, cos_bsd, sin_bsd)
        k_bshd = apply_rope(k_bshd, cos_bsd, sin_bsd)
        out_bshd = self.attn_fn(q_bshd, k_bshd, v_bshd, doc_ids=doc_ids, scale=self.scale)
        return self.o_proj(out_bshd.reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, intermediate_size: Optional[int] = None):
        super().__init__()
        inner = intermediate_size or args.intermediate_size
        self.gate_proj = nn.Linear(args.hidden_size, inner, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, inner, bias=False)
        self.down_proj = nn.Linear(inner, args.hidden_size, bias=False)

    def forward(self, x_bsh: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_bsh)) * self.up_proj(x_bsh))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; ``mlp`` is a :class:`MoE`
    block in the layers ``args.moe_layers`` lists."""

    def __init__(self, args: ModelArgs, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MoE(args) if layer_idx in args.moe_layers else MLP(args)

    def forward(self, x_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x_bsh = x_bsh + self.self_attn(self.input_layernorm(x_bsh), cos_bsd, sin_bsd, doc_ids)
        return x_bsh + self.mlp(self.post_attention_layernorm(x_bsh))


class Decoder(nn.Module):
    """The ``model.`` prefix of HF names: embedding, layers, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Transformer(nn.Module):
    """Causal decoder; ``forward`` returns logits, ``hidden_states`` the normed final states.

    Under autocast the residual stream (the embeddings, each layer's input and output) is kept in
    the autocast dtype, as with half-precision weights, unless :attr:`fp32_residual` is set (then
    the fp32 embedding output and the residual additions stay fp32).

    Args:
        args: the model geometry.
    """

    fp32_residual: bool = False
    """Keep the residual stream in fp32 under autocast (``trainer.fp32_residual``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        inv_freq, self.rope_attention_factor = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self.model.layers

    def _apply(self, fn, recurse: bool = True):
        """Convert (``.to``, ``.bfloat16()``, ...) every parameter in place, ``param.data = fn(param)``
        (its gradient alike), and every buffer, keeping the Parameter objects: torch's own behaviour
        for ordinary tensors, on which optimizers built before a conversion rely (DeepSpeed casts the
        module it wraps); where torch makes a new Parameter (a tensor of another kind, e.g. meta to
        CPU) so does this. For tensor subclasses torch swaps the tensor objects instead, which fails
        once a weak reference points to them, as it does to the fake tensors the planner runs this
        model on: those are converted in place too."""
        for module in self.modules() if recurse else [self]:
            for key, param in module._parameters.items():
                if param is None:
                    continue
                with torch.no_grad():
                    applied = fn(param)
                if applied is param:
                    pass
                elif type(applied) is not torch.Tensor or torch._has_compatible_shallow_copy_type(param, applied):
                    param.data = applied
                else:  # e.g. meta to CPU (weights loaded after a meta build): a new Parameter, as torch does
                    module._parameters[key] = param = nn.Parameter(applied, requires_grad=param.requires_grad)
                if param.grad is not None:
                    grad = fn(param.grad)
                    if grad is not param.grad:
                        param.grad.data = grad
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = fn(buf)
        return self

    @property
    def output_weight(self) -> torch.Tensor:
        """LM head weight [vocab, hidden] (the embedding weight when tied)."""
        return self.lm_head.weight

    def tie_weights(self) -> None:
        """Make the LM head share the embedding weight again when ``tie_embeddings`` (``to_empty``
        from the meta device creates separate parameters)."""
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self) -> None:
        """Recompute the RoPE buffer in fp32 (after ``to_empty`` or a cast of the whole module)."""
        self.inv_freq, self.rope_attention_factor = rope_frequencies(
            self.args.head_dim, self.args.rope_theta, self.args.rope_scaling, device=self.inv_freq.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialisation, deterministic given torch's seed: N(0, init_std) for matrices, with
        output projections (o_proj, down_proj, the experts' down_proj) scaled by 1/sqrt(2 * num_layers)
        so the residual stream's variance does not grow with depth; ones for norms, zeros for biases."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.num_layers)
        for name, module in self.named_modules():
            if module is self.lm_head and self.args.tie_embeddings:
                continue  # shares the embedding's weight, already drawn
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
                nn.init.normal_(module.down_proj, mean=0.0, std=out_std)
        self.reset_rope()

    @contextlib.contextmanager
    def rope_scaling(self, scaling: Optional[dict]):
        """Run the block with RoPE scaling ``scaling`` (a ``model.rope_scaling`` mapping, e.g. YaRN to
        evaluate beyond the trained length; None: plain RoPE); the model's own is restored on exit."""
        saved = self.args
        self.args = dataclasses.replace(saved, rope_scaling=scaling)  # validated like model.rope_scaling
        self.reset_rope()
        try:
            yield self
        finally:
            self.args = saved
            self.reset_rope()

    def set_attention_fn(self, fn: AttentionFn) -> None:
        """Use ``fn(q_bshd, k_bshd, v_bshd, doc_ids=, scale=) -> out_bshd`` in every layer."""
        for layer in self.layers:
            layer.self_attn.attn_fn = fn

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, S, head_dim] for ``position_ids`` [B, S], computed in fp32 and cast to ``dtype``."""
        if self.inv_freq.dtype != torch.float32:  # a module-wide cast (model.to(bf16)) lost precision
            self.reset_rope()
        angles_bsk = position_ids[..., None].float() * self.inv_freq
        angles_bsd = torch.cat((angles_bsk, angles_bsk), dim=-1)
        cos, sin = angles_bsd.cos(), angles_bsd.sin()
        if self.rope_attention_factor != 1.0:  # YaRN's attention temperature, folded into cos/sin as HF does
            cos, sin = cos * self.rope_attention_factor, sin * self.rope_attention_factor
        return cos.to(dtype), sin.to(dtype)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                      doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-normed hidden states [B, S, hidden] (the LM head is left to a chunked loss).

        Args:
            input_ids: [B, S] token ids.
            position_ids: [B, S] positions (restarting per document, global for a shard); None
                means ``arange(S)`` for every row.
            doc_ids: [B, S] document ids; attention never crosses a change of id. None means one
                document per row.
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        x_bsh = self.model.embed_tokens(input_ids)
        dtype = torch.get_autocast_dtype(x_bsh.device.type) if torch.is_autocast_enabled(x_bsh.device.type) \
            else x_bsh.dtype
        if not self.fp32_residual:  # the residual stream in the compute dtype (class docstring)
            x_bsh = x_bsh.to(dtype)
        cos_bsd, sin_bsd = self.rope(position_ids, dtype)
        for layer in self.layers:  # memory wrappers (checkpointing, StreamBP) live in the layers' forward
            x_bsh = layer(x_bsh, cos_bsd, sin_bsd, doc_ids)
        return self._final_norm(x_bsh)

    def _final_norm(self, x_bsh: torch.Tensor) -> torch.Tensor:
        """The final norm, recomputed in the backward in chunks of :data:`NORM_CHUNK` tokens: its
        backward (fp32 under autocast, and unfused when the input is bf16 and the weight fp32) would
        otherwise hold several fp32 copies of the whole sequence's states at once (docs/PLANNING.md)."""
        if not torch.is_grad_enabled() or x_bsh.shape[1] <= NORM_CHUNK:
            return self.model.norm(x_bsh)
        parts = [checkpoint(self.model.norm, part, use_reentrant=False) for part in x_bsh.split(NORM_CHUNK, dim=1)]
        return torch.cat(parts, dim=1)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, S, vocab] (fp32 when the parameters are); arguments as :meth:`hidden_states`."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, doc_ids))
