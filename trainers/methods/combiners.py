"""Gradient combiners (hook H5): how per-interval losses become ``.grad``.

* sum: backward of the weighter's scalar (DDP syncs gradients).
* PCGrad (Yu et al. 2020, as ANT applies it; docs/methods.md): per-interval gradients, projected
  onto the normal plane of conflicting originals in a freshly shuffled order, then averaged
  (``reduction: mean``, ANT's form) or summed.
* Nash-MTL (Navon et al. 2022; docs/methods.md): weights α with (GGᵀ)α = 1/α refreshed every
  ``every`` steps; update Σ α_k g_k / K, then the global gradient norm is clipped.

PCGrad and Nash need per-interval gradients, which DDP does not sync when they come from
``torch.autograd.grad``: each rank computes its surrogate gradients, they are averaged through the
Runtime explicitly, and every rank combines the identical matrix (docs/architecture.md,
"distribution rules"). The
shuffle generator is seeded from (seed, step) so all ranks shuffle alike.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from trainers.errors import ConfigError
from trainers.methods.grouped_grads import (DenseTaskGradients, GroupedGradientCapture, TaskGradients,
                                           write_gradient)
from trainers.methods.mtl.nash import nash_weights
from trainers.methods.mtl.pcgrad import pcgrad_weights

__all__ = ["SumCombiner", "PCGradCombiner", "NashCombiner", "interval_gradients", "task_gradients", "write_gradient"]


def interval_gradients(task_loss: torch.Tensor, active: torch.Tensor, params: list[nn.Parameter],
                       runtime: Any) -> torch.Tensor:
    """[K, P] gradients of each interval's (surrogate) loss, averaged across ranks: the fallback
    for models the layer-wise path does not cover, and the tests' reference.

    One batched backward (``is_grads_batched``: a vmap over the K one-hot output gradients)
    instead of K sequential backward passes; rows of inactive intervals are zero.
    """
    k = len(task_loss)
    idx = torch.nonzero(active.to(task_loss.device)).flatten()
    grads = torch.zeros(k, sum(p.numel() for p in params), device=task_loss.device)     # [K, P]
    if len(idx):
        basis = torch.eye(k, device=task_loss.device)[idx]                                  # [A, K]
        per_param = torch.autograd.grad(task_loss, params, grad_outputs=basis, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
        grads[idx] = torch.cat([(g if g is not None else torch.zeros(len(idx), *p.shape, device=p.device))
                                .reshape(len(idx), -1) for g, p in zip(per_param, params)], dim=1)
    return runtime.all_reduce(grads, op="mean") if runtime.world_size > 1 else grads


def task_gradients(task_loss: torch.Tensor, active: torch.Tensor, params: list[nn.Parameter], runtime: Any,
                   capture: Optional[GroupedGradientCapture] = None,
                   task: Optional[torch.Tensor] = None, keep: bool = False) -> TaskGradients:
    """The interval gradients as a Gram matrix plus a weighted-sum writer: layer by layer from the
    captured layer I/O (``keep``: each layer's K gradients held for the update), else from the
    batched backward's [K, P] matrix."""
    if capture is not None and task is not None and capture.usable():
        return capture.task_gradients(task_loss.sum(), task, active, runtime, keep=keep)
    return DenseTaskGradients(interval_gradients(task_loss, active, params, runtime), params)


def _no_extra(extra, name: str) -> None:
    if extra is not None:
        raise ConfigError(f"methods: an auxiliary loss cannot be combined with ANT-{name} (per-interval "
                          f"gradients); use methods.ant.mtl=uw or drop the method that adds it")


class SumCombiner:
    name = "sum"
    # The per-interval combiners read every layer's input and output gradient through module hooks
    # (grouped_grads.py); a torch.compile'd graph fuses those tensors away, so they run eagerly.
    compilable = True

    def manual_sync(self, step: int) -> bool:
        return False

    def capture(self, model: nn.Module, params: list[nn.Parameter], step: int):
        """Context active during the forward pass; per-interval combiners record layer I/O."""
        if not self.manual_sync(step):
            return contextlib.nullcontext()
        self._capture = GroupedGradientCapture(model, params)
        return self._capture

    def _task_gradients(self, task_loss, active, params, runtime, task) -> TaskGradients:
        capture, self._capture = getattr(self, "_capture", None), None
        return task_gradients(task_loss, active, params, runtime, capture, task,
                              keep=self.interval_grads == "keep")     # set by the per-interval combiners

    def combine(self, step, task_loss, task_count, active, weighter, params, runtime, task=None,
                extra=None) -> dict[str, float]:
        total = weighter.reduce(task_loss, task_count, active)
        (total if extra is None else total + extra).backward()
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}


class PCGradCombiner(SumCombiner):
    name = "pcgrad"
    compilable = False

    def __init__(self, seed: int, reduction: str, interval_grads: str):
        self.seed, self.reduction, self.interval_grads = seed, reduction, interval_grads

    def manual_sync(self, step: int) -> bool:
        return True

    def combine(self, step, task_loss, task_count, active, weighter, params, runtime, task=None,
                extra=None) -> dict[str, float]:
        _no_extra(extra, self.name)
        grads = self._task_gradients(task_loss, active, params, runtime, task)       # Gram + writer
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.nonzero(active.cpu()).flatten()
        weights = torch.zeros(len(active), dtype=torch.float64)
        weights[idx] = pcgrad_weights(grads.gram.cpu()[idx][:, idx], generator=gen)  # mean of projected
        if self.reduction == "sum":
            weights = weights * len(idx)
        grads.write(weights)
        return {}


class NashCombiner(SumCombiner):
    name = "nash"
    compilable = False

    def __init__(self, num_intervals: int, every: int, max_norm: float, interval_grads: str):
        self.every, self.max_norm, self.interval_grads = every, max_norm, interval_grads
        self.alpha = np.ones(num_intervals)
        self.failures = 0

    def manual_sync(self, step: int) -> bool:
        return step % self.every == 0

    def combine(self, step, task_loss, task_count, active, weighter, params, runtime, task=None,
                extra=None) -> dict[str, float]:
        _no_extra(extra, self.name)
        k = len(task_loss)
        act = active.cpu().numpy().astype(bool)
        if self.manual_sync(step):
            grads = self._task_gradients(task_loss, active, params, runtime, task)   # Gram + writer
            gram = grads.gram.cpu().numpy()[np.ix_(act, act)]
            new = nash_weights(gram, init=self.alpha[act])
            if new is None:
                self.failures += 1                                                # keep the previous α
            else:
                self.alpha[act] = new
            grads.write(torch.as_tensor(self.alpha * act / k))                    # Σ α_k g_k / K
        else:
            alpha = torch.as_tensor(self.alpha * act, dtype=task_loss.dtype, device=task_loss.device)
            ((alpha * task_loss).sum() / k).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return {"nash/grad_norm_preclip": float(norm)}

    def state_dict(self) -> dict:
        return {"alpha": torch.as_tensor(self.alpha), "failures": self.failures}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = state["alpha"].double().numpy().copy()
        self.failures = int(state.get("failures", 0))

    def metrics(self) -> dict[str, float]:
        out = {f"nash/alpha_{i}": float(a) for i, a in enumerate(self.alpha)}
        out["nash/solver_failures"] = float(self.failures)
        return out
