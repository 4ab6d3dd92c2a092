"""Fréchet distance between Gaussians fitted to feature sets (the "FID" metric).

Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", Eq. (6)::

    d²((μ1, Σ1), (μ2, Σ2)) = ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})

The matrix square root is taken without scipy. Σ1 Σ2 is not symmetric, but it is similar to the
symmetric PSD matrix M = Σ1^{1/2} Σ2 Σ1^{1/2} (conjugate by Σ1^{1/2}), so both
have the same non-negative eigenvalues λ_i and tr((Σ1 Σ2)^{1/2}) = Σ_i √λ_i. Both steps use
``numpy.linalg.eigh`` on symmetric matrices; round-off can make tiny eigenvalues negative, and
those are clipped to zero.

Near-singular covariances (fewer samples than dimensions, dead feature units) are handled as in
the reference implementations (TTUR ``fid.py``, pytorch-fid): if the eigendecompositions fail or
return a non-finite trace, ``eps·I`` is added to both covariances and the computation is retried.
"""
from __future__ import annotations

import numpy as np

from trainers.errors import ConfigError, DataError

__all__ = ["feature_stats", "frechet_distance", "trace_sqrt_product"]


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features[N, D]``."""
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise DataError(
            f"features: expected a 2-D array [N, D], got shape {feats.shape}; "
            "flatten each sample's features to one row"
        )
    if feats.shape[0] < 2:
        raise DataError(
            f"features: need at least 2 samples to estimate a covariance, got {feats.shape[0]}; "
            "pass more samples"
        )
    feats = feats.astype(np.float64, copy=False)
    if not np.isfinite(feats).all():
        raise DataError("features: contain NaN or infinite values; check the feature extractor")
    mu = feats.mean(axis=0)
    sigma = np.cov(feats, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via ``eigh``; negative round-off clipped to 0."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    root = np.sqrt(np.clip(eigvals, 0.0, None))
    return (eigvecs * root) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ1 Σ2)^{1/2}) computed as Σ √eig(Σ1^{1/2} Σ2 Σ1^{1/2}) (symmetric form)."""
    root1 = _symmetric_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = 0.5 * (middle + middle.T)
    eigvals = np.linalg.eigvalsh(middle)
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(
            f"{name}: mean shape {mu.shape} and covariance shape {sigma.shape} do not match; "
            "pass mu[D] and sigma[D, D] from feature_stats"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{name}: statistics contain NaN or infinite values; recompute them")
    return mu, 0.5 * (sigma + sigma.T)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6).

    ``eps`` is the ridge added to both covariances only when the plain computation fails or is
    not finite (as in pytorch-fid); the result is clipped at 0 against round-off.
    """
    if not eps > 0:
        raise ConfigError(f"eps: must be > 0, got {eps}; pass a small ridge such as 1e-6")
    mu1, sigma1 = _check_stats(mu1, sigma1, "mu1/sigma1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "mu2/sigma2")
    if mu1.shape != mu2.shape:
        raise DataError(
            f"mu1/mu2: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}); "
            "compute both statistics with the same feature extractor"
        )
    diff = mu1 - mu2
    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
        if not np.isfinite(tr_covmean):
            raise np.linalg.LinAlgError("non-finite trace")
    except np.linalg.LinAlgError:
        ridge = eps * np.eye(sigma1.shape[0])
        tr_covmean = trace_sqrt_product(sigma1 + ridge, sigma2 + ridge)
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(value, 0.0)
