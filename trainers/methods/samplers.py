"""Timestep samplers (the sampler slot): ``sample(n, generator) -> (t [n], w [n])``.

* :class:`UniformSampler`: ``t ~ U{0..T−1}`` (DDPM, Ho et al. 2020); also ANT's i.i.d. reading,
  where the batch is grouped into intervals afterwards (docs/methods.md, ANT).
* :class:`StratifiedSampler`: ANT (Go et al., NeurIPS 2023, arXiv 2306.00354): the local batch is
  split into equal contiguous chunks and chunk k draws ``t ~ U(interval k)``.

A pacer (the curriculum) narrows what a sampler may draw through ``restrict(allowed)``; a
stratified sampler then stratifies over the intervals that still have allowed timesteps. The
importance weights ``w`` are ones for both: neither corrects the marginal it induces.
"""
from __future__ import annotations

import torch

from trainers.methods.intervals import Intervals

__all__ = ["RestrictableSampler", "UniformSampler", "StratifiedSampler"]


class RestrictableSampler:
    """Shared bookkeeping: the allowed timesteps, their positions per interval, no state."""

    name = "uniform"

    def __init__(self, intervals: Intervals):
        self.intervals = intervals
        self.num_timesteps = intervals.num_timesteps
        self.restrict(torch.ones(self.num_timesteps, dtype=torch.bool))

    def restrict(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed.to(torch.bool).cpu()                          # [T]
        self.positions = torch.nonzero(self.allowed).flatten()               # allowed t values
        self.per_interval = [self.positions[(self.positions >= lo) & (self.positions < hi)]
                             for lo, hi in self.intervals.pairs()]
        self._active = torch.tensor([len(p) > 0 for p in self.per_interval])

    def active_intervals(self) -> torch.Tensor:
        return self._active.clone()

    def state_dict(self) -> dict:
        return {}            # the restriction is the pacer's state, re-applied after it loads

    def load_state_dict(self, state: dict) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {"sampler/active_lo": float(self.positions.min()), "sampler/active_hi": float(self.positions.max() + 1),
                "sampler/active_intervals": float(self._active.sum())}


class UniformSampler(RestrictableSampler):
    name = "uniform"

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.positions), (n,), generator=generator)
        return self.positions[idx], torch.ones(n)                              # [n], [n]


class StratifiedSampler(RestrictableSampler):
    name = "stratified"

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        active = [p for p in self.per_interval if len(p)]
        base, extra = divmod(n, len(active))
        chunks = []
        for k, pos in enumerate(active):
            size = base + (1 if k < extra else 0)
            chunks.append(pos[torch.randint(len(pos), (size,), generator=generator)])
        return torch.cat(chunks), torch.ones(n)                                 # [n], grouped by interval
