"""What the real training code needs to run on fake tensors, and nothing else.

- :func:`convert_in_place`: ``Module.to`` / ``.bfloat16()`` on fake parameters. torch converts a
  module holding fake parameters by swapping the tensors (``torch.utils.swap_tensors``), which
  refuses tensors that a weak reference points to (fake parameters always have one); DeepSpeed
  moves and casts the module it wraps. Inside the block a module whose parameters are fake is
  converted by assigning ``param.data``, torch's behaviour for ordinary tensors.
- :func:`local_rank`: DeepSpeed reads ``LOCAL_RANK``, which a launcher sets; a plan has none.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator
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


__all__ = ["convert_in_place", "local_rank"]
