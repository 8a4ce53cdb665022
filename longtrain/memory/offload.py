"""Activation offload: a saved tensor parked in pinned host memory until the backward needs it.

The device-to-host copy runs on one side stream per device, so the forward does not wait for it;
the backward waits for the copy's event before bringing the tensor back. Used by StreamBP
(``memory.offload_checkpoints``) for each layer's saved input.
"""
from __future__ import annotations

from typing import Dict

import torch

_SIDE_STREAMS: Dict[torch.device, "torch.cuda.Stream"] = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The copy stream of ``device`` (a CUDA device), made on first use and shared by every copy."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class HostCopy:
    """A tensor parked in pinned host memory, copied on the device's side stream so the forward
    does not wait for it; :meth:`fetch` brings it back to the device in the backward. On a CPU
    device it is kept as is.

    Args:
        x_bsh: the tensor to park (a layer input [B, S, hidden]).
    """

    def __init__(self, x_bsh: torch.Tensor) -> None:
        self.device = x_bsh.device
        if not x_bsh.is_cuda:
            self.tensor, self.event = x_bsh, None
            return
        stream = side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # x is complete before it is copied
        self.tensor = torch.empty(x_bsh.shape, dtype=x_bsh.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            self.tensor.copy_(x_bsh, non_blocking=True)
        x_bsh.record_stream(stream)  # the allocator must not reuse x until the copy is done
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def fetch(self) -> torch.Tensor:
        """The tensor on its original device, ordered after the host copy on the current stream."""
        if self.event is None:
            return self.tensor
        torch.cuda.current_stream(self.device).wait_event(self.event)
        return self.tensor.to(self.device, non_blocking=True)
