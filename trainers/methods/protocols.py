"""The slots of the training step and what a method contributes to them (docs/architecture.md).

| slot               | owners       | protocol             | built-in owners                          |
| model transform    | ordered list | ``ModelTransform``   | DTR, DMP                                 |
| timestep sampler   | one          | ``TimestepSampler``  | uniform, ANT stratified, MEME soft       |
| pacer              | 0–1          | ``Pacer``            | curriculum (adaptive, fixed)             |
| loss weighter      | one          | ``LossWeighter``     | mean, ANT-UW                             |
| gradient combiner  | one          | ``GradientCombiner`` | sum, ANT-PCGrad, ANT-NashMTL             |
| auxiliary loss     | list         | ``AuxLoss``          | DMP prompt balancing                     |

Per-sample loss weights (Min-SNR, P2) belong to the loss config and apply before grouping.
Every stateful plug-in round-trips through ``state_dict`` / ``load_state_dict``.

What the loop honours, declared by plug-ins (never by method name): parameter groups with their
own lr / weight decay (``ParamGroup``; parameters outside the model are all-reduced by the loop,
those inside it by DDP), parameters the EMA must follow instead of averaging (``ema=False``), a
frozen backbone (``Contribution.freeze_backbone``: out of the optimizer and ``requires_grad=False``)
and manual gradient sync (``GradientCombiner.manual_sync``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from trainers.methods.intervals import Intervals

__all__ = ["BuildContext", "ParamGroup", "Contribution", "Stateful", "ModelTransform", "TransformBase",
           "TimestepSampler",
           "Pacer", "LossWeighter", "GradientCombiner", "AuxLoss", "Summary"]


@dataclass(frozen=True)
class BuildContext:
    """What plug-ins may know about the run when they are built."""
    intervals: Intervals
    num_timesteps: int
    snr: np.ndarray              # [T] float64
    local_batch: int
    world_size: int
    seed: int
    device: torch.device = torch.device("cpu")


@dataclass
class ParamGroup:
    """Parameters a plug-in adds, optimised in their own AdamW group."""
    name: str
    params: list[nn.Parameter]
    lr: Optional[float] = None               # None: train.lr
    weight_decay: Optional[float] = None     # None: train.weight_decay
    ema: bool = True                         # False: the EMA copy follows the live value


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def metrics(self) -> dict[str, float]: ...


class ModelTransform(Protocol):
    """Applied to the backbone after its base weights are loaded (staged loading)."""
    name: str
    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module: ...
    def param_groups(self, model: nn.Module) -> list[ParamGroup]: ...     # parameters it added
    def begin_step(self, model: nn.Module, step: int, rank: int) -> None: ...   # before each training forward


class TransformBase:
    """Defaults for a model transform: adds no parameters, needs nothing before a step."""
    name = "transform"

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        return []

    def begin_step(self, model: nn.Module, step: int, rank: int) -> None:
        return None


class TimestepSampler(Stateful, Protocol):
    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...
    # -> t [n] int64, w [n] float32 importance weights (ones by default)
    def restrict(self, allowed: torch.Tensor) -> None: ...     # [T] bool, from the pacer
    def active_intervals(self) -> torch.Tensor: ...            # [K] bool: intervals it can draw


class Pacer(Stateful, Protocol):
    monitor: str                                               # metric the pacer watches ("mse" | "loss")
    # optional `watches: bool = True`: False lets the step skip reading the loss to the host
    def allowed(self) -> torch.Tensor: ...                     # [T] bool
    def observe(self, loss: float) -> bool: ...                # global loss; True when `allowed` changed


class LossWeighter(Stateful, Protocol):
    def reduce(self, task_loss: torch.Tensor, task_count: torch.Tensor, active: torch.Tensor) -> torch.Tensor: ...
    def param_groups(self) -> list[ParamGroup]: ...            # parameters outside the model
    def after_backward(self, active: torch.Tensor) -> None: ...   # active: [K] bool on the HOST (no device wait)


class GradientCombiner(Stateful, Protocol):
    name: str
    compilable: bool                                           # False: train.compile leaves the model eager
    def manual_sync(self, step: int) -> bool: ...              # True: the combiner syncs gradients itself
    def capture(self, model: nn.Module, params: list[nn.Parameter], step: int) -> Any: ...   # context manager
    def combine(self, step: int, task_loss: torch.Tensor, task_count: torch.Tensor, active: torch.Tensor,
                weighter: LossWeighter, params: list[nn.Parameter], runtime: Any,
                task: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None) -> dict[str, float]: ...


class Summary(Protocol):
    """A JSON-able picture of what a method learned, written at the end of a run as
    ``summaries/<name>.json`` (the orchestrator also renders ``kind: heatmap`` as a PNG)."""
    name: str
    def __call__(self, model: nn.Module) -> dict: ...
    # -> {"kind": "heatmap", "title", "xlabel", "ylabel", "rows": [labels], "values": [[...]]}


class AuxLoss(Protocol):
    """A term added to the reduced loss, read from the model after its forward pass."""
    name: str
    def __call__(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    # -> (scalar to add, detached terms to log)


@dataclass
class Contribution:
    """What one method puts into the plan (every field optional)."""
    transforms: list = field(default_factory=list)          # [ModelTransform]
    sampler: Optional[Any] = None                           # TimestepSampler
    pacer: Optional[Any] = None                             # Pacer
    weighter: Optional[Any] = None                          # LossWeighter
    combiner: Optional[Any] = None                          # GradientCombiner
    aux_losses: list = field(default_factory=list)          # [AuxLoss]
    summaries: list = field(default_factory=list)           # [Summary]
    freeze_backbone: bool = False                           # train only what transforms add
