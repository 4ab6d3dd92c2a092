"""Improved precision and recall of a generative model from k-NN feature manifolds.

Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
Models", Sec. 2, Eq. (1)-(2). The manifold of a feature set Φ is the union of balls centred on
each φ ∈ Φ with radius ‖φ − NN_k(φ)‖ (distance to its k-th nearest neighbour in Φ, itself
excluded)::

    f(φ, Φ)    = 1 if ‖φ − φ'‖ ≤ ‖φ' − NN_k(φ')‖ for some φ' ∈ Φ, else 0
    precision  = mean_{φ_g ∈ Φ_g} f(φ_g, Φ_r)
    recall     = mean_{φ_r ∈ Φ_r} f(φ_r, Φ_g)

Distances come from ``torch.cdist`` in float64, ``batch`` rows at a time, so memory stays at
``batch × max(N_real, N_fake)`` and a few thousand points run in seconds on a CPU. The
real–fake distances are computed once and serve both precision and recall.
"""
from __future__ import annotations

import numpy as np
import torch

from trainers.errors import ConfigError, DataError

__all__ = ["knn_radii", "precision_recall"]


def _as_points(points: np.ndarray, name: str) -> torch.Tensor:
    arr = np.asarray(points)
    if arr.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array [N, D] of features, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: contains NaN or infinite values; check the feature extractor")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))


def knn_radii(points: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in ``points`` (self excluded)."""
    radii = torch.empty(points.shape[0], dtype=points.dtype)
    for start in range(0, points.shape[0], batch):
        dist = torch.cdist(points[start:start + batch], points)
        # The k+1 smallest include the point itself at distance 0.
        radii[start:start + batch] = dist.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def precision_recall(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 3,
    batch: int = 1024,
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real``.

    ``real[N_r, D]`` and ``fake[N_g, D]`` are feature vectors; ``k`` is the neighbourhood size
    (the paper's default is 3); ``batch`` bounds the rows of each distance block.
    Returns ``{"precision": float, "recall": float}``, each in [0, 1].
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k: must be a positive integer, got {k!r}; the paper uses k=3")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch: must be a positive integer, got {batch!r}; try 1024")
    real_t = _as_points(real, "real")
    fake_t = _as_points(fake, "fake")
    if real_t.shape[1] != fake_t.shape[1]:
        raise DataError(
            f"real/fake: feature dimensions differ ({real_t.shape[1]} vs {fake_t.shape[1]}); "
            "extract both with the same network"
        )
    smallest = min(real_t.shape[0], fake_t.shape[0])
    if smallest <= k:
        raise ConfigError(
            f"k: needs more than k={k} points in each set, got {smallest}; "
            "lower k or pass more samples"
        )
    radii_real = knn_radii(real_t, k, batch)
    radii_fake = knn_radii(fake_t, k, batch)
    fake_covered = torch.zeros(fake_t.shape[0], dtype=torch.bool)
    real_covered = torch.zeros(real_t.shape[0], dtype=torch.bool)
    for start in range(0, real_t.shape[0], batch):
        dist = torch.cdist(real_t[start:start + batch], fake_t)  # [b, N_g]
        # Recall: a real point lies inside some fake sample's ball.
        real_covered[start:start + batch] = (dist <= radii_fake[None, :]).any(dim=1)
        # Precision: a fake point lies inside some real sample's ball.
        fake_covered |= (dist <= radii_real[start:start + batch, None]).any(dim=0)
    return {
        "precision": float(fake_covered.double().mean()),
        "recall": float(real_covered.double().mean()),
    }
