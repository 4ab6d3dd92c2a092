"""Inception Score from classifier logits.

Salimans et al. 2016, "Improved Techniques for Training GANs", Sec. 4::

    IS = exp( E_x KL( p(y|x) ‖ p(y) ) ),   p(y) = E_x p(y|x)

computed, as in the reference implementation, on ``splits`` equal-ish chunks of the samples;
the mean and standard deviation over chunks are returned. Probabilities come from a
log-softmax of the logits for numerical stability.
"""
from __future__ import annotations

import numpy as np

from trainers.errors import ConfigError, DataError

__all__ = ["inception_score"]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` chunks of ``logits[N, C]``.

    The score lies in [1, C]: 1 when every prediction is identical (or uniform), C when
    predictions are confident and spread evenly over all classes.
    """
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise DataError(f"logits: expected a 2-D array [N, C], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError("logits: contain NaN or infinite values; check the classifier")
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= arr.shape[0]:
        raise ConfigError(
            f"splits: must be an integer in [1, N={arr.shape[0]}], got {splits!r}; "
            "use 10 with at least 10 samples"
        )
    log_p = _log_softmax(arr)
    scores = []
    for chunk in np.array_split(log_p, splits, axis=0):
        log_marginal = np.log(np.exp(chunk).mean(axis=0, keepdims=True))
        kl = (np.exp(chunk) * (chunk - log_marginal)).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))
