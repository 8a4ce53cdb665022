"""What the real training code needs to run on fake tensors, and nothing else.

- :func:`convert_in_place`: ``Module.to`` / ``.bfloat16()`` on fake parameters. torch converts a
  module holding fake parameters by swapping the tensors (``torch.utils.swap_tensors``), which
  refuses tensors that a weak reference points to (fake parameters always have one); DeepSpeed
  moves and casts the module it wraps. Inside the block a module whose parameters are fake is
  converted by assigning ``param.data``, torch's behaviour for ordinary tensors.
- :func:`local_rank`: DeepSpeed reads ``LOCAL_RANK``, which a launcher sets; a plan has none.
- :func:`zero_offload_on_host`: ZeRO-Offload. DeepSpeed steps its host AdamW, a C++ kernel that
  reads the tensors' memory (fake tensors have none): inside the block the host optimizer is
  :class:`HostAdamStandIn`, which keeps the same state and skips the arithmetic (the real one
  updates in place, on the host, with no temporaries). DeepSpeed runs on its CPU accelerator in a
  plan, where host and device tensors are alike; it page-locks (``pin_memory``) the host buffers
  of an offload, so inside the block every tensor it pins is counted as host memory.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

_MODULE_APPLY = nn.Module._apply


def _apply(self: nn.Module, fn, recurse: bool = True):
    if not any(isinstance(p, FakeTensor) for p in self.parameters(recurse=False)):
        if recurse:
            for child in self.children():
                child._apply(fn)
        return _MODULE_APPLY(self, fn, recurse=False)
    if recurse:
        for child in self.children():
            child._apply(fn)
    for param in self._parameters.values():
        if param is None:
            continue
        with torch.no_grad():
            applied = fn(param)
        if applied is not param:
            param.data = applied
        if param.grad is not None:
            grad = fn(param.grad)
            if grad is not param.grad:
                param.grad.data = grad
    for key, buf in self._buffers.items():
        if buf is not None:
            self._buffers[key] = fn(buf)
    return self


@contextmanager
def convert_in_place() -> Iterator[None]:
    """Within the block, converting a module with fake parameters assigns ``param.data``."""
    with mock.patch.object(nn.Module, "_apply", _apply):
        yield


@contextmanager
def local_rank(rank: int = 0) -> Iterator[None]:
    """``LOCAL_RANK`` set to ``rank`` for the block unless a launcher set it."""
    if "LOCAL_RANK" in os.environ:
        yield
        return
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        yield
    finally:
        os.environ.pop("LOCAL_RANK", None)


class HostAdamStandIn(torch.optim.Optimizer):
    """AdamW's state (step, exp_avg, exp_avg_sq per parameter) without its arithmetic: the host
    optimizer of a planned ZeRO-Offload step (module docstring)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, **_):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)


@contextmanager
def zero_offload_on_host(zero_extra: dict, offloads: Iterable[str], mark_host: Callable[[torch.Tensor], None]
                         ) -> Iterator[dict]:
    """Within the block ``longtrain.parallel.zero.cpu_adam`` builds :class:`HostAdamStandIn` and
    every tensor DeepSpeed pins is passed to ``mark_host``; yields ``zero_extra`` (``zero.extra``)
    with DeepSpeed's check for its own host optimizer off and pinning on for ``offloads``
    (``offload_optimizer``, ``offload_param``)."""
    from deepspeed.accelerator import get_accelerator

    def pin(tensor, *args, **kwargs):
        mark_host(tensor)
        return tensor

    pinned = {"pin_memory": True}
    extra = {**zero_extra, "zero_force_ds_cpu_optimizer": False}
    extra["zero_optimization"] = {**extra.get("zero_optimization", {}), **{name: pinned for name in offloads}}
    with mock.patch("longtrain.parallel.zero.cpu_adam", HostAdamStandIn), \
            mock.patch.object(get_accelerator(), "pin_memory", pin):
        yield extra


__all__ = ["HostAdamStandIn", "convert_in_place", "local_rank", "zero_offload_on_host"]
