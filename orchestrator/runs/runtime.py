"""The trainers Runtime over Ray Train's torch process group (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainers.runtime import DistRuntime, LocalRuntime

__all__ = ["ray_runtime"]


class RayRuntime(DistRuntime):
    """``DistRuntime`` whose model wrapping and device come from Ray Train."""

    def __init__(self):
        import ray.train.torch                                           # RAY
        super().__init__(device=ray.train.torch.get_device())           # RAY

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch                                           # RAY
        return ray.train.torch.prepare_model(model)                     # RAY: device + DDP when W > 1


def ray_runtime():
    """A RayRuntime inside a Train worker with a process group, else a LocalRuntime on its device."""
    if dist.is_available() and dist.is_initialized():
        return RayRuntime()
    import ray.train.torch                                               # RAY
    return LocalRuntime(ray.train.torch.get_device())
