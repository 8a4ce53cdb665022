"""StreamBP: exact backpropagation of a decoder layer streamed along the sequence.

Gradient checkpointing keeps each layer's input and recomputes the whole layer in the backward, so
the backward of one layer still holds the full sequence's activations (q, k, v, attention output,
the MLP's ``[S, intermediate]`` tensors) at once. StreamBP keeps the same input but walks the
backward in chunks of the sequence, so at any moment only one chunk's activations exist:

1. K and V of the whole sequence are recomputed once without autograd (after k-norm and RoPE):
   ``[S, Hkv, D]`` each, small next to the MLP's working set.
2. For each chunk ``[s, e)`` the chunk's forward is recomputed with autograd: its queries, its
   attention over the keys ``[0, e)`` (causal and document-masked; the block kernels skip the keys
   a chunk cannot see), the output projection, the residuals and the MLP. Back-propagating the
   chunk's output gradient gives the chunk's input gradient, this chunk's share of every weight
   gradient and of dK/dV for the prefix, accumulated in fp32 buffers (dK/dV: a key gets a share from
   every later chunk) and, for the input gradient, in the input's dtype (two additions per token,
   as autograd itself accumulates two uses of a tensor).
3. dK and dV are pushed through k-norm/RoPE and the K/V projections chunk by chunk, adding the
   rest of the input gradient and of the norm and projection weight gradients.

How a chunk gets its keys is the attention function's answer, not this module's: step 1 hands
this rank's K/V to ``attn_fn.chunk_keys(...)``, which returns a
:class:`~longtrain.kernels.attention.ChunkKeys` (the whole-sequence K/V the chunks read, the key
prefix a chunk may see, how it attends, and how dK/dV get back to this rank's own tokens) or None
when attention cannot stream (an attention function without ``chunk_keys`` counts as None, and
``can_stream`` answers the same question without tensors). Local attention streams with no
communication. With Ulysses attention the chunks are chunks of the local slice: step 1 sends K/V
through the all-to-all once (every rank then holds its heads of the whole sequence), each chunk's
queries go through the all-to-all, attend to the key prefix and come back, and the accumulated
dK/dV return with one all-to-all before step 3 (the KV replicas of GQA are summed).
With ring or hybrid attention, whose keys live on other ranks, only the attention core (Q, K, V ->
output) runs whole, through the attention function's own forward and backward (one ring pass each,
as under gradient checkpointing; the ring's block kernels tile the local queries), and the norm,
the projections, the residuals and the MLP stream in chunks around it (:mod:`longtrain.memory.two_pass`).
Streaming the ring by key prefix instead would run one ring pass per chunk: C chunks would cost C
times the ring's bytes.

MoE layers. The chunked recomputation routes every token to the experts the forward chose (kept
as [B, S, top_k] ids), so a near-tie in the router that rounding could flip between a chunk and
the whole sequence cannot change the function being differentiated; the routing weights are
recomputed from the router, so the router's gradient is exact too. A capacity factor depends on
the whole batch and is refused (:func:`~longtrain.memory.wrappers.apply_streambp`).

The result equals ordinary backprop up to summation order (tested in fp64 to 1e-10 relative). The
weight gradients leave the layer once, after the last chunk, so a gradient hook (DDP, ZeRO) fires
once per layer per backward, not once per chunk.

Partitioned parameters (ZeRO-3). The caller may pass ``param_gather``, a factory
``param_gather(params) -> context manager`` in which ``params`` are whole (the ZeRO side installs
one, :func:`~longtrain.parallel.zero.install_param_gather`). With one, the layer's parameters are
gathered once for the forward and once for the whole streamed backward (held until their
gradients have been accumulated), and the chunks run the submodules' ``forward`` directly so the
per-module hooks do not gather them again per chunk. This module knows nothing else of ZeRO.

Layouts: ``x_bsh`` [B, S, hidden]; ``k_bshd``/``v_bshd`` [B, S, Hkv, D]; ``q_bchd`` [B, chunk, Hq, D].
"""
from __future__ import annotations

from typing import Callable, ContextManager, List, Optional, Sequence, Union

import torch
from torch import nn

from longtrain.kernels.attention import ChunkKeys
from longtrain.memory.layer_parts import accumulate, keys_values, mlp_branch, queries, run, whole_in_chunks
from longtrain.memory.offload import HostCopy
from longtrain.memory.two_pass import attention_half_whole, backward_attention_whole
from longtrain.models.llama import DecoderLayer
from longtrain.models.moe import MoE

HostCopyFactory = Callable[[torch.Tensor], HostCopy]
"""Makes the host-side holder of a layer's saved input: ``factory(x_bsh).fetch()`` gives it back."""

ParamGather = Callable[[List[torch.Tensor]], ContextManager]
"""``factory(params) -> context manager`` in which ``params`` are whole (module docstring)."""


class _HeldGather:
    """Partitioned parameters gathered in a streamed backward and held until their gradients have
    been accumulated: autograd runs a parameter's AccumulateGrad (and ZeRO-3's reduce hook on it)
    right after the node that produced the gradient, before the nodes upstream, so
    :class:`_ReleaseAfterBackward`, placed on the layer input, releases them after that."""

    def __init__(self, param_gather: ParamGather, params: Sequence[torch.Tensor]) -> None:
        self.param_gather, self.params, self.context = param_gather, list(params), None

    def gather(self) -> None:
        self.context = self.param_gather(self.params)
        self.context.__enter__()

    def release(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None


class _ReleaseAfterBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, held, x_bsh):
        ctx.held = held
        return x_bsh.view_as(x_bsh)

    @staticmethod
    def backward(ctx, grad_bsh):
        ctx.held.release()
        return None, grad_bsh


def can_stream(attn_fn) -> bool:
    """Whether ``attn_fn`` streams its keys (``attn_fn.can_stream``; False for a function without
    the streaming contract of :mod:`longtrain.kernels.attention`)."""
    return bool(getattr(attn_fn, "can_stream", False))


def _chunk_keys(layer: DecoderLayer, chunk: int, x_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
                doc_ids: Optional[torch.Tensor]) -> ChunkKeys:
    """The attention function's key strategy for ``layer`` (one that streams, :func:`can_stream`),
    over K and V made ``chunk`` tokens at a time (meant without autograd)."""
    attn = layer.self_attn
    k_bshd, v_bshd = whole_in_chunks(lambda x, cos, sin: keys_values(layer, x, cos, sin), x_bsh, cos_bsd, sin_bsd,
                                     chunk)
    keys = attn.attn_fn.chunk_keys(k_bshd, v_bshd, doc_ids, attn.scale, attn.num_heads)
    assert keys is not None, f"{attn.attn_fn!r} says it can stream but returned no chunk keys"
    return keys


def _attention_half(layer: DecoderLayer, x_bch: torch.Tensor, keys: ChunkKeys, k_bshd: torch.Tensor,
                    v_bshd: torch.Tensor, cos_bcd: torch.Tensor, sin_bcd: torch.Tensor, start: int) -> torch.Tensor:
    """``x + attn(norm(x))`` for the tokens ``[start, start + chunk)`` given the keys they may see."""
    attn = layer.self_attn
    b, c, _ = x_bch.shape
    q_bchd = queries(layer, x_bch, cos_bcd, sin_bcd, v_bshd.dtype)
    out_bchd = keys.attend(q_bchd, start, start + c, k_bshd, v_bshd)
    return x_bch + run(attn.o_proj, out_bchd.reshape(b, c, -1))


def _chunk_output(layer: DecoderLayer, x_bch: torch.Tensor, keys: ChunkKeys, k_bshd: torch.Tensor,
                  v_bshd: torch.Tensor, cos_bcd: torch.Tensor, sin_bcd: torch.Tensor, start: int,
                  routing_bck: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's output for the tokens ``[start, start + chunk)`` given the keys they may see
    (and, for an MoE layer in the backward, the experts the forward chose for them)."""
    h_bch = _attention_half(layer, x_bch, keys, k_bshd, v_bshd, cos_bcd, sin_bcd, start)
    return h_bch + mlp_branch(layer, h_bch, routing_bck)


def _mlp_in_chunks(layer: DecoderLayer, h_bsh: torch.Tensor, chunk: int) -> torch.Tensor:
    """``h + mlp(norm(h))`` of a streamed layer's forward (no autograd), ``chunk`` tokens at a time
    for a dense MLP, so its ``[S, intermediate]`` working set never exists for the whole sequence
    (the MLP acts on each token alone: the result is the same). An MoE block runs whole: its
    routing, kept for the backward, and its load statistics are the whole sequence's."""
    seq = h_bsh.shape[1]
    if isinstance(layer.mlp, MoE) or chunk >= seq:
        return h_bsh + mlp_branch(layer, h_bsh)
    out_bsh = torch.empty_like(h_bsh)
    for start in range(0, seq, chunk):
        end = min(start + chunk, seq)
        out_bsh[:, start:end] = h_bsh[:, start:end] + mlp_branch(layer, h_bsh[:, start:end])
    return out_bsh


def _routing(layer: DecoderLayer, x_bsh: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, S, top_k] expert ids the latest forward of ``layer``'s MoE block chose; None if dense."""
    if not isinstance(layer.mlp, MoE):
        return None
    return layer.mlp.last_routing.experts.view(*x_bsh.shape[:2], -1)


class _StreamedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, chunk_size, offload, held, cos_bsd, sin_bsd, doc_ids, x_bsh, *params):
        ctx.layer, ctx.chunk_size, ctx.held = layer, chunk_size, held
        device_type = x_bsh.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.host_copy = offload(x_bsh) if offload is not None else None
        ctx.save_for_backward(None if offload else x_bsh, cos_bsd, sin_bsd, doc_ids)
        if held is None:  # the attention half as the layer's own forward runs it
            h_bsh = x_bsh + layer.self_attn(layer.input_layernorm(x_bsh), cos_bsd, sin_bsd, doc_ids)
        else:  # gathered by streamed_layer: compute without the module hooks
            h_bsh = attention_half_whole(layer, chunk_size, x_bsh, cos_bsd, sin_bsd, doc_ids)
        out_bsh = _mlp_in_chunks(layer, h_bsh, chunk_size)
        ctx.routing_bsk = _routing(layer, x_bsh)
        return out_bsh

    @staticmethod
    def backward(ctx, dout_bsh):
        layer = ctx.layer
        x_bsh, cos_bsd, sin_bsd, doc_ids = ctx.saved_tensors
        if ctx.host_copy is not None:
            x_bsh, ctx.host_copy = ctx.host_copy.fetch(), None
        params = [p for p in layer.parameters() if p.requires_grad]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        x_bsh = x_bsh.detach()
        if ctx.held is not None:
            ctx.held.gather()  # once for the whole streamed backward; released by _ReleaseAfterBackward
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            if can_stream(layer.self_attn.attn_fn):
                dx_bsh, dparams = _stream_whole_layer(layer, ctx.chunk_size, x_bsh, dout_bsh, cos_bsd,
                                                      sin_bsd, doc_ids, params, ctx.routing_bsk)
            else:
                dx_bsh, dparams = backward_attention_whole(layer, ctx.chunk_size, x_bsh, dout_bsh, cos_bsd,
                                                           sin_bsd, doc_ids, params, ctx.routing_bsk)
        ctx.routing_bsk = None
        dparams = [None if g is None else g.to(p.dtype) for g, p in zip(dparams, params)]
        return (None, None, None, None, None, None, None, dx_bsh.to(x_bsh.dtype), *dparams)


def _stream_whole_layer(layer: DecoderLayer, chunk: int, x_bsh, dout_bsh, cos_bsd, sin_bsd, doc_ids,
                        params, routing_bsk=None):
    """Backward of a layer with local or Ulysses attention, every part streamed (module docstring)."""
    seq = x_bsh.shape[1]
    # dX in the input's dtype: each token gets exactly two additions (its chunk's pass and the K/V
    # pass), the rounding autograd's own accumulation of two uses makes; dK/dV sum over many chunks.
    dx_bsh = torch.zeros_like(x_bsh)
    dparams: List[Optional[torch.Tensor]] = [None] * len(params)
    with torch.no_grad():
        keys = _chunk_keys(layer, chunk, x_bsh, cos_bsd, sin_bsd, doc_ids)
    acc_dtype = torch.promote_types(keys.k_bshd.dtype, torch.float32)
    dk_bshd = torch.zeros(keys.k_bshd.shape, dtype=acc_dtype, device=x_bsh.device)
    dv_bshd = torch.zeros_like(dk_bshd)
    for start in range(0, seq, chunk):
        end = min(start + chunk, seq)
        key_end = keys.key_end(start, end)
        with torch.enable_grad():
            x_bch = x_bsh[:, start:end].requires_grad_()
            k_prefix, v_prefix = (t[:, :key_end].detach().requires_grad_() for t in (keys.k_bshd, keys.v_bshd))
            routing_bck = None if routing_bsk is None else routing_bsk[:, start:end]
            out_bch = _chunk_output(layer, x_bch, keys, k_prefix, v_prefix, cos_bsd[:, start:end],
                                    sin_bsd[:, start:end], start, routing_bck)
        grads = torch.autograd.grad(out_bch, [x_bch, k_prefix, v_prefix, *params], dout_bsh[:, start:end],
                                    allow_unused=True)
        dx_bsh[:, start:end] += grads[0]
        dk_bshd[:, :key_end] += grads[1]
        dv_bshd[:, :key_end] += grads[2]
        accumulate(dparams, grads[3:])
    keys.k_bshd = keys.v_bshd = None  # free the whole-sequence K/V before the projection pass
    dk_bshd, dv_bshd = keys.local_grads(dk_bshd, dv_bshd)
    for start in range(0, seq, chunk):  # dK, dV through k-norm, RoPE and the projections
        end = min(start + chunk, seq)
        with torch.enable_grad():
            x_bch = x_bsh[:, start:end].requires_grad_()
            k_bchd, v_bchd = keys_values(layer, x_bch, cos_bsd[:, start:end], sin_bsd[:, start:end])
        grads = torch.autograd.grad([k_bchd, v_bchd], [x_bch, *params],
                                    [dk_bshd[:, start:end].to(k_bchd.dtype),
                                     dv_bshd[:, start:end].to(v_bchd.dtype)], allow_unused=True)
        dx_bsh[:, start:end] += grads[0]
        accumulate(dparams, grads[1:])
    return dx_bsh, dparams


def streamed_layer(layer: DecoderLayer, x_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
                   doc_ids: Optional[torch.Tensor], chunk_size: int,
                   offload: Union[bool, HostCopyFactory, None] = False,
                   param_gather: Optional[ParamGather] = None) -> torch.Tensor:
    """``layer(x_bsh, cos_bsd, sin_bsd, doc_ids)`` whose backward streams along the sequence.

    Args:
        layer: a :class:`~longtrain.models.llama.DecoderLayer`. When its attention function
            streams its keys (``can_stream``: local, Ulysses over local) all of it streams;
            otherwise (ring, hybrid, a plain function) everything but the attention core streams
            (:mod:`longtrain.memory.two_pass`).
        x_bsh: [B, S, hidden] layer input (the only activation kept for the backward).
        cos_bsd, sin_bsd: [B, S, head_dim] RoPE tables.
        doc_ids: [B, S] document ids, or None.
        chunk_size: tokens per backward chunk (any positive number; need not divide S).
        offload: keep the saved input in host memory until the backward needs it instead of on the
            GPU: True parks it in pinned host memory, copied on a side stream
            (:class:`~longtrain.memory.offload.HostCopy`); a factory ``offload(x_bsh)`` returning an
            object with ``fetch()`` parks it its own way (the planner's accounting stand-in);
            False or None keeps it.
        param_gather: for partitioned parameters (ZeRO-3), ``param_gather(params)`` is a context
            in which they are whole (module docstring); None when they are whole already.

    Returns:
        The layer output [B, S, hidden]; its backward gives exact gradients of ``x_bsh`` and of
        every parameter of ``layer``.

    Raises:
        ValueError: ``chunk_size < 1``.
    """
    if chunk_size < 1:
        raise ValueError(f"memory.streambp.chunk_size must be positive, got {chunk_size}")
    params = [p for p in layer.parameters() if p.requires_grad]
    offload = HostCopy if offload is True else (offload or None)
    if param_gather is None:
        return _StreamedLayer.apply(layer, chunk_size, offload, None, cos_bsd, sin_bsd, doc_ids, x_bsh, *params)
    held = _HeldGather(param_gather, params)
    x_bsh = _ReleaseAfterBackward.apply(held, x_bsh)
    with param_gather(params):  # whole parameters while autograd records their shapes
        return _StreamedLayer.apply(layer, chunk_size, offload, held, cos_bsd, sin_bsd, doc_ids, x_bsh, *params)


def is_streamable(module: nn.Module) -> bool:
    """Whether ``module`` is a decoder layer whose attention :func:`streamed_layer` streams by key
    prefix too (local or Ulysses attention); otherwise (ring, hybrid) the attention core runs whole
    and the rest streams (:mod:`longtrain.memory.two_pass`)."""
    return isinstance(module, DecoderLayer) and can_stream(module.self_attn.attn_fn)


def chunk_working_set_bytes(args, batch: int, elem_bytes: int) -> int:
    """Bytes one streamed chunk token costs in the backward: the chunk's recomputed activations
    (layer input, norms, q, attention output, residual, MLP gate/up/activation/product, output) and
    as many again for their gradients, for ``batch`` sequences. In an MoE layer a token's MLP width
    is that of its ``top_k`` routed experts plus the shared ones; the widest layer counts."""
    inner = args.intermediate_size if len(args.moe_layers) < args.num_layers else 0
    if args.moe_layers:
        inner = max(inner, args.top_k * args.expert_size + args.shared_size)
    per_token = 6 * args.hidden_size + 2 * args.num_heads * args.head_dim + 4 * inner
    return 2 * per_token * elem_bytes * batch


def auto_chunk_size(args, seq_len: int, batch: int, free_bytes: Optional[int], elem_bytes: int = 2,
                    share: float = 0.125, multiple: int = 256, default: int = 4096) -> int:
    """``memory.streambp.chunk_size=auto``: the largest multiple of ``multiple`` tokens whose
    backward working set (:func:`chunk_working_set_bytes`) takes at most ``share`` of the free
    device memory, between ``multiple`` and ``seq_len``; ``default`` when free memory is unknown
    (CPU). Larger chunks run the matmuls at higher efficiency; smaller ones save memory."""
    if free_bytes is None:
        return min(default, seq_len)
    per_token = chunk_working_set_bytes(args, batch, elem_bytes)
    chunk = int(free_bytes * share // per_token) // multiple * multiple
    return max(min(chunk, seq_len), min(multiple, seq_len))
