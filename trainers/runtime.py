"""The Runtime: ranks, device and collectives, as the training loop sees them.

``LocalRuntime`` is one process. ``DistRuntime`` wraps an initialised ``torch.distributed``
process group (gloo on CPU, NCCL on GPU); the orchestrator's Ray runtime subclasses it. Collectives
are split from computation (docs/architecture.md): the loop reduces statistics here, then calls
pure update functions with the reduced values.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Protocol

import torch
import torch.nn as nn

__all__ = ["Runtime", "LocalRuntime", "DistRuntime", "sync_gradients"]


class Runtime(Protocol):
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool: ...
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...
    def wrap_model(self, model: nn.Module) -> nn.Module: ...
    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager: ...
    def barrier(self) -> None: ...


class LocalRuntime:
    """A single process: collectives are identities."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        return True

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def barrier(self) -> None:
        return None


class DistRuntime:
    """Over an initialised ``torch.distributed`` default group; DDP for the model."""

    _OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}

    def __init__(self, device: str | torch.device | None = None):
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("DistRuntime needs torch.distributed.init_process_group() first")
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device or "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:                  # a one-worker group: no collective per step
            return tensor
        if op == "mean":
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
            return tensor.div_(self.world_size)
        self._dist.all_reduce(tensor, op=getattr(self._dist.ReduceOp, self._OPS[op]))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            self._dist.broadcast(tensor, src=src)
        return tensor

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    def barrier(self) -> None:
        self._dist.barrier()


def sync_gradients(params: Iterable[torch.nn.Parameter], runtime: Runtime) -> None:
    """Average ``.grad`` of parameters DDP does not own (e.g. UW log-variances) across ranks."""
    if runtime.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    runtime.all_reduce(flat, op="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
