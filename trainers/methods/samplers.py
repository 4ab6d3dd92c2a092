"""Timestep samplers (hook H1).

* uniform: t ~ U{0..T−1} (DDPM).
* stratified (ANT, arXiv 2306.00354 §1.3 of METHODS.md): the local batch is split into equal
  contiguous chunks, chunk k draws t ~ U(interval k).
* iid (ANT [INF]): uniform t, grouped afterwards (masked means handle empty intervals).
* with a pacer (curriculum, arXiv 2403.10348 §4.3): only the timesteps of the active clusters are
  drawn; with ANT stratification only the ANT intervals that meet the active set are used.
"""
from __future__ import annotations

from typing import Optional

import torch

from trainers.methods.intervals import Intervals

__all__ = ["IntervalSampler"]


class IntervalSampler:
    """One sampler for every mode; the pacer (optional) shrinks the allowed timestep set."""

    def __init__(self, intervals: Intervals, mode: str = "uniform", pacer=None,
                 clusters: Optional[list[tuple[int, int]]] = None, order: Optional[list[int]] = None):
        self.intervals, self.mode, self.pacer = intervals, mode, pacer
        self.clusters, self.order = clusters, order
        self.num_timesteps = intervals.num_timesteps
        self._refresh()

    def _allowed_mask(self) -> torch.Tensor:
        if self.pacer is None:
            return torch.ones(self.num_timesteps, dtype=torch.bool)
        mask = torch.zeros(self.num_timesteps, dtype=torch.bool)
        for cluster in self.order[: self.pacer.num_active()]:
            lo, hi = self.clusters[cluster]
            mask[lo:hi] = True
        return mask

    def _refresh(self) -> None:
        self.allowed = self._allowed_mask()                                  # [T] bool
        self.positions = torch.nonzero(self.allowed).flatten()               # allowed t values
        self.per_interval = [self.positions[(self.positions >= lo) & (self.positions < hi)]
                             for lo, hi in self.intervals.pairs()]
        self._active = torch.tensor([len(p) > 0 for p in self.per_interval])

    def active_intervals(self) -> torch.Tensor:
        return self._active.clone()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.mode != "stratified":
            idx = torch.randint(len(self.positions), (n,), generator=generator)
            return self.positions[idx]
        active = [p for p in self.per_interval if len(p)]
        base, extra = divmod(n, len(active))
        chunks = []
        for k, pos in enumerate(active):
            size = base + (1 if k < extra else 0)
            chunks.append(pos[torch.randint(len(pos), (size,), generator=generator)])
        return torch.cat(chunks)                                              # [n], grouped by interval

    def observe(self, loss: float) -> bool:
        if self.pacer is None:
            return False
        moved = self.pacer.update(loss)
        if moved:
            self._refresh()
        return moved

    def state_dict(self) -> dict:
        return {"pacer": self.pacer.state_dict()} if self.pacer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.pacer is not None and "pacer" in state:
            self.pacer.load_state_dict(state["pacer"])
            self._refresh()

    def metrics(self) -> dict[str, float]:
        out = {"sampler/active_lo": float(self.positions.min()), "sampler/active_hi": float(self.positions.max() + 1),
               "sampler/active_intervals": float(self._active.sum())}
        if self.pacer is not None:
            out.update({f"curriculum/{k}": float(v) for k, v in self.pacer.metrics().items()})
        return out
