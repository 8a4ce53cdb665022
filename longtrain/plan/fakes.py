"""What the real training code needs to run on fake tensors, and nothing else. Each piece reaches
the code it serves through a seam that code offers (the builder's :class:`~longtrain.trainer.build.Seams`)
or through the library's own extension point; nothing is patched.

- :func:`local_rank`: DeepSpeed reads ``LOCAL_RANK``, which a launcher sets; a plan has none.
- :class:`HostAdamStandIn`: ZeRO-Offload's host optimizer (``Seams.host_optimizer``). DeepSpeed
  steps its host AdamW, a C++ kernel that reads the tensors' memory (fake tensors have none); the
  stand-in keeps the same state and skips the arithmetic (the real one updates in place, on the
  host, with no temporaries).
- :class:`PlannedHostCopy`: StreamBP's host copy of a layer input (``Seams.host_copy``) as it
  behaves on a GPU, for a plan whose tensors all live on the CPU.
- :func:`zero_offload_on_host`: DeepSpeed runs on its CPU accelerator in a plan, where host and
  device tensors are alike; it page-locks (``pin_memory``) the host buffers of an offload. Within
  the block DeepSpeed's accelerator is :class:`HostCountingAccelerator` (installed with DeepSpeed's
  own ``set_accelerator``), which counts every tensor it is asked to pin as host memory.

(A module holding fake parameters is converted in place by the model's own ``_apply``, see
:class:`~longtrain.models.Transformer`.)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

if TYPE_CHECKING:
    from longtrain.plan.tracker import StepTracker


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


def host_counting_accelerator(mark_host: Callable[[torch.Tensor], None]):
    """DeepSpeed's CPU accelerator whose ``pin_memory`` hands each tensor to ``mark_host`` and returns it
    as it is (a fake tensor cannot be page-locked; a plan counts it as host memory instead)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class HostCountingAccelerator(CPU_Accelerator):
        def pin_memory(self, tensor, *args, **kwargs):
            mark_host(tensor)
            return tensor

    return HostCountingAccelerator()


@contextmanager
def zero_offload_on_host(zero_extra: dict, offloads: Iterable[str], mark_host: Callable[[torch.Tensor], None]
                         ) -> Iterator[dict]:
    """Within the block DeepSpeed's accelerator counts every tensor it pins as host memory
    (``mark_host``); yields ``zero_extra`` (``zero.extra``) with DeepSpeed's check for its own host
    optimizer off (the plan steps :class:`HostAdamStandIn`) and pinning on for ``offloads``
    (``offload_optimizer``, ``offload_param``)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    pinned = {"pin_memory": True}
    extra = {**zero_extra, "zero_force_ds_cpu_optimizer": False}
    extra["zero_optimization"] = {**extra.get("zero_optimization", {}), **{name: pinned for name in offloads}}
    before = get_accelerator()
    set_accelerator(host_counting_accelerator(mark_host))
    try:
        yield extra
    finally:
        set_accelerator(before)


class PlannedHostCopy:
    """:class:`~longtrain.memory.offload.HostCopy` as it behaves on a GPU, for a plan whose tensors
    all live on the CPU (the builder's ``Seams.host_copy``): the parked tensor becomes a host tensor
    (counted as host memory by ``tracker``, so the device copy is free once nothing else holds it)
    and :meth:`fetch` brings a new device copy."""

    def __init__(self, x_bsh: torch.Tensor, tracker: "StepTracker") -> None:
        # as HostCopy: a host buffer, then the copy into it, which the tracker times as device-to-host
        self.tensor = torch.empty_like(x_bsh)
        tracker.mark_host(self.tensor)
        self.tensor.copy_(x_bsh.detach())

    def fetch(self) -> torch.Tensor:
        out, self.tensor = self.tensor.clone(), None
        return out


__all__ = ["HostAdamStandIn", "PlannedHostCopy", "host_counting_accelerator", "local_rank", "zero_offload_on_host"]
