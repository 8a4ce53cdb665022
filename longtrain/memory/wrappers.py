"""Memory wrappers of decoder layers: activation checkpointing and StreamBP.

Each ``apply_*`` function gives every layer of ``model.layers`` a wrapped forward and logs one line.
The layer is not nested under a new module: its class is swapped for a subclass of it, made once
per (class, wrapper), whose ``forward`` checkpoints or streams while ``self.training and
torch.is_grad_enabled()`` and otherwise runs the plain forward (``plain_forward``, the class's own).
FSDP2's ``fully_shard`` swaps classes the same way. So parameter names, ``state_dict()`` keys, the
Hugging Face conversion and module hooks (ZeRO-3 registers its own on the instances) are unchanged;
the wrappers add only plain attributes (``streambp_chunk``, ``streambp_offload``: the host-copy
factory of an offloaded input or None, ``param_gather``), none of them parameters or buffers.

A layer takes one wrapper. Wrapping a wrapped layer again, with the same wrapper or the other,
raises ``ValueError`` (StreamBP already recomputes what checkpointing would, and two settings of
one wrapper would leave it unclear which holds); :func:`unwrap_layers` restores the plain classes.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longtrain.memory.offload import HostCopy
from longtrain.memory.streambp import (HostCopyFactory, ParamGather, is_streamable,
                                      streamed_layer)

log = logging.getLogger(__name__)

_CLASSES: Dict[Tuple[type, str], type] = {}


def _checkpointed_forward(self, x_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
                          doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    if self.training and torch.is_grad_enabled():
        # The plain forward, not self: the recomputation runs with autograd on and must not
        # checkpoint again.
        return checkpoint(self.plain_forward, x_bsh, cos_bsd, sin_bsd, doc_ids, use_reentrant=False)
    return self.plain_forward(x_bsh, cos_bsd, sin_bsd, doc_ids)


def _streamed_forward(self, x_bsh: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor,
                      doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    if self.training and torch.is_grad_enabled():
        return streamed_layer(self, x_bsh, cos_bsd, sin_bsd, doc_ids, self.streambp_chunk, self.streambp_offload,
                              self.param_gather)
    return self.plain_forward(x_bsh, cos_bsd, sin_bsd, doc_ids)


def _set_param_gather(self, factory: Optional[ParamGather]) -> None:
    """Gather this layer's partitioned parameters with ``factory(params) -> context manager``
    (ZeRO-3: ``deepspeed.zero.GatheredParameters``), once for the forward and once for the
    streamed backward; None: the parameters are whole."""
    self.param_gather = factory


_WRAPPERS: Dict[str, Dict[str, Callable]] = {
    "Checkpointed": {"forward": _checkpointed_forward},
    "Streamed": {"forward": _streamed_forward, "set_param_gather": _set_param_gather},
}
_ATTRIBUTES = ("streambp_chunk", "streambp_offload", "param_gather")


def _wrapped_class(base: type, kind: str) -> type:
    """The subclass of ``base`` with the ``kind`` wrapper's methods, made once."""
    if (base, kind) not in _CLASSES:
        namespace = dict(_WRAPPERS[kind], plain_forward=base.forward, layer_wrapper=kind, __module__=__name__)
        _CLASSES[(base, kind)] = type(f"{kind}{base.__name__}", (base,), namespace)
    return _CLASSES[(base, kind)]


def _wrap_layers(model: nn.Module, kind: str) -> nn.ModuleList:
    layers = model.layers
    for i, layer in enumerate(layers):  # every layer is checked before any is changed
        if getattr(layer, "layer_wrapper", None) is not None:
            raise ValueError(f"model.layers.{i} is already wrapped ({layer.layer_wrapper}); a layer takes one memory "
                             "wrapper: memory.checkpointing and memory.streambp.enabled are exclusive "
                             "(unwrap_layers(model) first to change it)")
    for layer in layers:
        layer.__class__ = _wrapped_class(type(layer), kind)
    return layers


def apply_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer of ``model.layers`` in the backward while training
    (non-reentrant ``torch.utils.checkpoint``); eval and no-grad forwards run plainly.

    Raises:
        ValueError: a layer is already wrapped (module docstring).
    """
    layers = _wrap_layers(model, "Checkpointed")
    log.info("activation checkpointing: %d decoder layers recompute their forward in the backward", len(layers))


def apply_streambp(model: nn.Module, chunk_size: int, offload: bool, host_copy: HostCopyFactory = HostCopy) -> None:
    """Stream the backward of each decoder layer of ``model.layers`` along the sequence in chunks of
    ``chunk_size`` tokens while training (:mod:`longtrain.memory.streambp`); eval and no-grad
    forwards run plainly. Apply it after sequence parallelism: each layer streams what its attention
    function allows (local, Ulysses: every part; ring, hybrid: the MLP half).

    Args:
        model: a :class:`~longtrain.models.Transformer` (``model.args``, ``model.layers``).
        chunk_size: tokens per backward chunk (need not divide the sequence).
        offload: park each layer's saved input in pinned host memory until its backward.
        host_copy: what parks it (``host_copy(x_bsh).fetch()`` gives it back): pinned host memory
            copied on a side stream (:class:`~longtrain.memory.offload.HostCopy`), or a tool's own
            (the planner counts it as host memory on fake tensors).

    Raises:
        ValueError: ``chunk_size < 1``; an MoE model with a capacity factor; a layer already wrapped.
    """
    if chunk_size < 1:
        raise ValueError(f"memory.streambp.chunk_size must be positive, got {chunk_size}")
    if model.args.moe_layers and model.args.capacity_factor is not None:
        raise ValueError("memory.streambp: model.moe.capacity_factor drops assignments by their place in the "
                         "whole batch, which a chunked recomputation cannot reproduce; set "
                         "model.moe.capacity_factor=null or turn StreamBP off")
    layers = _wrap_layers(model, "Streamed")
    for layer in layers:
        layer.streambp_chunk, layer.param_gather = chunk_size, None
        layer.streambp_offload = host_copy if offload else None
    streams = "every part" if all(is_streamable(layer) for layer in layers) \
        else "all but the attention core (ring or hybrid attention runs whole)"
    log.info("StreamBP: %d decoder layers stream their backward in chunks of %d tokens, streaming %s%s", len(layers),
             chunk_size, streams, "; layer inputs offloaded to host memory" if offload else "")


def unwrap_layers(model: nn.Module) -> None:
    """Give every wrapped layer of ``model.layers`` its plain class back (and drop the wrapper's
    attributes); plain layers are left as they are."""
    num_unwrapped = 0
    for layer in model.layers:
        if getattr(layer, "layer_wrapper", None) is None:
            continue
        layer.__class__ = type(layer).__bases__[0]
        for name in _ATTRIBUTES:
            layer.__dict__.pop(name, None)
        num_unwrapped += 1
    log.info("memory wrappers: %d decoder layers unwrapped", num_unwrapped)
