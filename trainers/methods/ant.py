"""ANT: Addressing Negative Transfer in diffusion models (Go et al., NeurIPS 2023,
arXiv 2306.00354; METHODS.md §1). Timesteps are clustered into intervals (``intervals.py``) and
the intervals are treated as tasks for multi-task optimisation: Uncertainty Weighting (a loss
weighter), PCGrad or Nash-MTL (gradient combiners). This module holds the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainers.errors import ConfigError

__all__ = ["AntConfig"]


@dataclass(frozen=True)
class AntConfig:
    mtl: Literal["uw", "pcgrad", "nash"] = "uw"
    sampling: Literal["stratified", "iid"] = "stratified"
    uw_lr: float = 0.025               # own AdamW param group, weight decay 0
    nash_every: int = 25               # refresh α every N steps
    nash_max_norm: float = 1.0         # global grad-norm clip on the Nash path

    def __post_init__(self) -> None:
        if self.uw_lr <= 0:
            raise ConfigError("methods.ant.uw_lr: must be > 0 (paper: 0.025)")
        if self.nash_every < 1:
            raise ConfigError("methods.ant.nash_every: must be >= 1 (paper: 25)")
        if self.nash_max_norm <= 0:
            raise ConfigError("methods.ant.nash_max_norm: must be > 0 (paper: 1.0)")
