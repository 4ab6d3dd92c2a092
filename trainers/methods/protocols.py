"""The method slots of the training step (ARCHITECTURE.md §4; METHODS.md §0.3 hooks H1–H6).

| slot               | owners       | filled by                                    |
| model transform    | ordered list | DTR (later DMP, MEME architecture)           |
| timestep sampler   | one          | uniform, ANT stratified/iid, curriculum      |
| pacer              | 0–1          | curriculum (adaptive, fixed), inside sampler |
| loss weighter      | one          | mean, ANT-UW                                 |
| gradient combiner  | one          | sum, ANT-PCGrad, ANT-NashMTL                 |

Per-sample weights (Min-SNR, P2) are part of the loss config, applied before grouping.
Every stateful plug-in round-trips through ``state_dict`` / ``load_state_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from trainers.methods.intervals import Intervals

__all__ = ["BuildContext", "ModelTransform", "TimestepSampler", "LossWeighter", "GradientCombiner",
           "Stateful"]


@dataclass(frozen=True)
class BuildContext:
    """What plug-ins may know about the run when they are built."""
    intervals: Intervals
    num_timesteps: int
    snr: np.ndarray              # [T] float64
    local_batch: int
    world_size: int
    seed: int


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def metrics(self) -> dict[str, float]: ...


class ModelTransform(Protocol):
    name: str
    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module: ...


class TimestepSampler(Stateful, Protocol):
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor: ...      # t [n] int64
    def observe(self, loss: float) -> bool: ...          # global loss; True when the stage moved
    def active_intervals(self) -> torch.Tensor: ...     # [K] bool


class LossWeighter(Stateful, Protocol):
    def reduce(self, task_loss: torch.Tensor, task_count: torch.Tensor, active: torch.Tensor) -> torch.Tensor: ...
    def param_groups(self) -> list[dict[str, Any]]: ...
    def after_backward(self, active: torch.Tensor) -> None: ...


class GradientCombiner(Stateful, Protocol):
    def manual_sync(self, step: int) -> bool: ...
    def capture(self, model: nn.Module, params: list[nn.Parameter], step: int) -> Any: ...   # context manager
    def combine(self, step: int, task_loss: torch.Tensor, task_count: torch.Tensor, active: torch.Tensor,
                weighter: LossWeighter, params: list[nn.Parameter], runtime: Any,
                task: torch.Tensor | None = None) -> dict[str, float]: ...
