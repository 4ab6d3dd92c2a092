"""Loss weighters (the weighter slot): reduce per-interval losses to the scalar that is differentiated.

``task_loss[k]`` arrives as a *surrogate* ``W · S_k^local / C_k^global`` (W ranks, S the local sum
of per-sample losses in interval k, C the global count), so that averaging gradients across ranks
(DDP) yields exactly the gradient of the global per-interval mean. Every weighter below is linear
in ``task_loss`` for fixed own parameters, which keeps that identity exact.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trainers.methods.mtl.uw import uw_loss, uw_weights
from trainers.methods.protocols import ParamGroup

__all__ = ["MeanWeighter", "UncertaintyWeighter"]


class MeanWeighter:
    """Vanilla: the mean of the per-sample losses over the (global) batch."""
    name = "mean"

    def reduce(self, task_loss, task_count, active) -> torch.Tensor:
        counts = task_count.to(task_loss.dtype)
        return (task_loss * counts).sum() / counts.sum().clamp(min=1.0)

    def param_groups(self) -> list[ParamGroup]:
        return []

    def after_backward(self, active) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}


class UncertaintyWeighter:
    """ANT-UW (Kendall et al. 2018, as ANT applies it; docs/methods.md): L = Σ ½(e^{−s_k} L_k / K + s_k).

    One scalar parameter per interval so an inactive interval (empty under the curriculum) can be
    skipped by the optimizer entirely (``grad = None``): Adam momentum never moves it.
    """
    name = "uw"

    def __init__(self, num_intervals: int, lr: float, device: torch.device | str = "cpu"):
        self.log_vars = nn.ParameterList([nn.Parameter(torch.zeros((), device=device)) for _ in range(num_intervals)])
        self.lr = lr

    def _s(self) -> torch.Tensor:
        return torch.stack(list(self.log_vars))                                    # [K]

    def reduce(self, task_loss, task_count, active) -> torch.Tensor:
        return uw_loss(task_loss, self._s(), active)

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("uw", list(self.log_vars), lr=self.lr, weight_decay=0.0)]

    def after_backward(self, active) -> None:
        for k, p in enumerate(self.log_vars):
            if not bool(active[k]):
                p.grad = None

    def state_dict(self) -> dict:
        return {"log_vars": self._s().detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, v in zip(self.log_vars, state["log_vars"]):
                p.copy_(v)

    def metrics(self) -> dict[str, float]:
        w = uw_weights(self._s().detach())
        return {f"uw/weight_{k}": float(v) for k, v in enumerate(w)}
