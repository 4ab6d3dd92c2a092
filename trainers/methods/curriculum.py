"""Task-difficulty curriculum (Kim et al., ICLR 2025, arXiv 2403.10348; METHODS.md §4).

Uniform timestep clusters ordered easy → hard (high t → low t); stage n trains on the union of the
n easiest clusters; after the last stage the run continues with full-range training. The pacer
(adaptive or fixed) decides when to add the next cluster from the loss all-reduced across ranks,
so every rank takes the same decision. Only the timestep sampler (H1) changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from trainers.errors import ConfigError
from trainers.methods.pacing import AdaptivePacer, FixedPacer, cluster_order, curriculum_clusters

__all__ = ["CurriculumConfig", "build_pacer", "build_clusters"]


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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ConfigError("methods.curriculum.clusters: must be >= 1 (the paper uses 20)")
        if self.patience < 1 or self.stage_steps < 1:
            raise ConfigError("methods.curriculum.patience/stage_steps: must be >= 1")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError("methods.curriculum.ema: must be in [0, 1)")


def build_pacer(cfg: CurriculumConfig):
    if cfg.pacing == "fixed":
        return FixedPacer(cfg.clusters, cfg.stage_steps, cfg.schedule)
    return AdaptivePacer(cfg.clusters, cfg.patience, cfg.delta, cfg.ema, cfg.mode, cfg.converge_window)


def build_clusters(cfg: CurriculumConfig, num_timesteps: int) -> tuple[list[tuple[int, int]], list[int]]:
    if cfg.clusters > num_timesteps:
        raise ConfigError(f"methods.curriculum.clusters: {cfg.clusters} exceeds diffusion.steps={num_timesteps}")
    return curriculum_clusters(num_timesteps, cfg.clusters), cluster_order(cfg.clusters, cfg.ordering, cfg.seed)
