"""Batches placed on the accelerator ahead of the step that uses them.

On CUDA, step k+1's batch is pinned and copied on a side stream while step k computes; the
compute stream waits for that copy only when it needs the batch. Elsewhere (CPU) the batch
source is used as it is. The batch of a step is a pure function of the step (``StepBatches``),
so prefetching changes no result and resuming needs no extra state.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DevicePrefetch", "on_device"]


class DevicePrefetch:
    """``get(step)`` like the wrapped batch source, with tensors already on ``device``."""

    def __init__(self, batches, device: torch.device, last_step: int):
        self.batches, self.device, self.last_step = batches, device, last_step
        self.stream = torch.cuda.Stream(device)
        self.pending: dict[int, tuple] = {}

    def __getattr__(self, name):                 # image_size, channels, num_classes, heldout, decode ...
        return getattr(self.batches, name)

    def _copy(self, step: int) -> tuple:
        x0, y = self.batches.get(step)
        with torch.cuda.stream(self.stream):
            x0 = x0.pin_memory().to(self.device, non_blocking=True)
            y = None if y is None else y.pin_memory().to(self.device, non_blocking=True)
        return x0, y

    def get(self, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x0, y = self.pending.pop(step, None) or self._copy(step)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for tensor in (x0, y):
            if tensor is not None:
                tensor.record_stream(current)    # the allocator keeps it until the step is done with it
        if step + 1 < self.last_step:
            self.pending = {step + 1: self._copy(step + 1)}
        return x0, y


def on_device(batches, device: torch.device, last_step: int):
    """The batch source the loop reads: prefetching on CUDA, unchanged elsewhere."""
    return DevicePrefetch(batches, device, last_step) if device.type == "cuda" else batches
