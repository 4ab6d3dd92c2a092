"""Task-difficulty curriculum (Kim et al., ICLR 2025, arXiv 2403.10348; docs/methods.md, "Curriculum").

Uniform timestep clusters ordered easy → hard (high t → low t); stage n trains on the union of the
n easiest clusters; after the last stage the run continues with full-range training. The pacer
(adaptive or fixed, ``pacing.py``) decides when to add the next cluster from a loss all-reduced
across ranks, so every rank takes the same decision. The method owns only the pacer slot: it
narrows what the run's timestep sampler may draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from trainers.errors import ConfigError
from trainers.methods.intervals import Intervals, resolve_intervals
from trainers.methods.pacing import AdaptivePacer, FixedPacer, cluster_order
from trainers.methods.protocols import BuildContext, Contribution
from trainers.methods.registry import MethodDescriptor, register

__all__ = ["CurriculumConfig", "CurriculumPacer", "build_pacer", "curriculum_intervals", "DESCRIPTOR"]


@dataclass(frozen=True)
class CurriculumConfig:
    clusters: int = 20                 # N; the paper's DiT setting
    pacing: Literal["adaptive", "fixed"] = "adaptive"
    patience: int = 200                # τ (unofficial re-implementation's value; not in the paper)
    delta: float = 0.0                 # δ, minimum improvement
    ema: float = 0.99                  # smoothing of the monitored loss; 0 = raw
    mode: Literal["patience", "cap"] = "patience"   # the two readings of "max patience"
    converge_window: Optional[int] = None             # cap mode only
    stage_steps: int = 100             # fixed pacing: K
    schedule: Literal["constant", "linear"] = "constant"   # fixed pacing: K or n·K steps per stage
    ordering: Literal["easy_to_hard", "hard_to_easy", "random"] = "easy_to_hard"
    monitor: Literal["mse", "loss"] = "mse"    # the loss the pacer watches: ε-MSE or the full training loss
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ConfigError("methods.curriculum.clusters: must be >= 1 (the paper uses 20)")
        if self.patience < 1 or self.stage_steps < 1:
            raise ConfigError("methods.curriculum.patience/stage_steps: must be >= 1")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError("methods.curriculum.ema: must be in [0, 1)")


def build_pacer(cfg: CurriculumConfig):
    """The stage state machine (``pacing.py``) for this config."""
    if cfg.pacing == "fixed":
        return FixedPacer(cfg.clusters, cfg.stage_steps, cfg.schedule)
    return AdaptivePacer(cfg.clusters, cfg.patience, cfg.delta, cfg.ema, cfg.mode, cfg.converge_window)


def curriculum_intervals(cfg: CurriculumConfig, num_timesteps: int) -> Intervals:
    """The curriculum's N clusters: uniform intervals from the same resolver as ANT's."""
    if cfg.clusters > num_timesteps:
        raise ConfigError(f"methods.curriculum.clusters: {cfg.clusters} exceeds diffusion.steps={num_timesteps}")
    return resolve_intervals("uniform", num_timesteps, cfg.clusters)[0]


class CurriculumPacer:
    """The pacer slot: stage n allows the timesteps of the first n clusters of the order."""

    name = "curriculum"

    def __init__(self, cfg: CurriculumConfig, num_timesteps: int):
        self.clusters = curriculum_intervals(cfg, num_timesteps)
        self.order = cluster_order(cfg.clusters, cfg.ordering, cfg.seed)
        self.machine = build_pacer(cfg)
        self.monitor = cfg.monitor

    def allowed(self) -> torch.Tensor:
        mask = torch.zeros(self.clusters.num_timesteps, dtype=torch.bool)     # [T]
        pairs = self.clusters.pairs()
        for cluster in self.order[: self.machine.num_active()]:
            lo, hi = pairs[cluster]
            mask[lo:hi] = True
        return mask

    def observe(self, loss: float) -> bool:
        return self.machine.update(loss)

    def state_dict(self) -> dict:
        return self.machine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.machine.load_state_dict(state)

    def metrics(self) -> dict[str, float]:
        return {f"curriculum/{k}": float(v) for k, v in self.machine.metrics().items()}


def _build(cfg: CurriculumConfig, ctx: BuildContext) -> Contribution:
    return Contribution(pacer=CurriculumPacer(cfg, ctx.num_timesteps))


DESCRIPTOR = register(MethodDescriptor(
    name="curriculum", config=CurriculumConfig, build=_build, claims=lambda cfg: ("pacer",),
    examples={"curriculum": {"clusters": 4, "pacing": "fixed", "stage_steps": 2}},
    tested_with=(("ant-uw", "curriculum"), ("curriculum", "dtr"), ("ant-uw", "curriculum", "dtr")),
    refusal="ANT PCGrad/Nash need every interval each step, which the curriculum withholds; "
            "use methods.ant.mtl=uw with the curriculum",
    summary="timestep clusters trained easy to hard with a pacing function (Kim et al., ICLR 2025)"))
