"""Per-sample loss weights for ε-prediction as pure functions of SNR(t).

docs/methods.md, "Loss weightings" (the weightings the DTR and DMP papers train with), with
``SNR(t) = ᾱ_t / (1 − ᾱ_t)``:

* ``constant``: ``w = 1``.
* ``min_snr`` — Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
  ICCV 2023 (arXiv 2303.09556), ε-prediction form: ``w = min(SNR, γ) / SNR`` (typical γ = 5).
* ``p2`` — Choi et al., "Perception Prioritized Training of Diffusion Models", CVPR 2022
  (arXiv 2204.00227): ``w = 1 / (k + SNR)^γ``.

Weights multiply the per-sample mse term only, never the learned-Σ ``vb`` term.

SNR = 0 (possible at ``t = T−1`` on some schedules) must not produce NaN/inf:

* ``min_snr`` is computed as ``γ / max(SNR, γ)``, identical to ``min(SNR, γ)/SNR`` for SNR > 0
  and equal to its limit 1 at SNR → 0 (every SNR ≤ γ gives exactly 1).
* ``p2`` requires ``k > 0``, so ``(k + SNR)^γ >= k^γ > 0``; at SNR = 0 it gives ``k^−γ``.

Inputs are assumed non-negative (they come from a noise schedule); tensor values are not checked
so that no device sync happens in the step. SNR = +inf gives 0 for both ``min_snr`` and ``p2``
(``γ > 0``).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from trainers.errors import ConfigError

__all__ = ["WEIGHTINGS", "constant_weight", "min_snr_weight", "p2_weight", "loss_weight"]


def _check_snr(snr: torch.Tensor) -> None:
    if not isinstance(snr, torch.Tensor) or not snr.dtype.is_floating_point:
        raise ConfigError("snr must be a floating-point tensor; pass SNR(t) gathered per sample")


def _check_number(name: str, value: float, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}; use e.g. {name}=1.0")
    if not positive and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}; use e.g. {name}=1.0")


def constant_weight(snr: torch.Tensor) -> torch.Tensor:
    """``w = 1`` with the shape, dtype and device of ``snr``."""
    _check_snr(snr)
    return torch.ones_like(snr)


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ for ε-prediction: ``min(SNR, γ)/SNR``, computed as ``γ / max(SNR, γ)``."""
    _check_snr(snr)
    _check_number("gamma", gamma, positive=True)
    return float(gamma) / snr.clamp_min(float(gamma))


def p2_weight(snr: torch.Tensor, gamma: float, k: float = 1.0) -> torch.Tensor:
    """P2 weighting ``1 / (k + SNR)^γ``; ``γ = 0`` gives exactly 1; needs ``k > 0``."""
    _check_snr(snr)
    _check_number("gamma", gamma, positive=False)
    _check_number("k", k, positive=True)
    return (snr + float(k)).pow(-float(gamma))


WEIGHTINGS: dict[str, Callable[..., torch.Tensor]] = {
    "constant": constant_weight,
    "min_snr": min_snr_weight,
    "p2": p2_weight,
}


def loss_weight(name: str, snr_t: torch.Tensor, **params: float) -> torch.Tensor:
    """Dispatch to the weighting ``name`` with its keyword parameters (``gamma``, ``k``)."""
    fn = WEIGHTINGS.get(name)
    if fn is None:
        raise ConfigError(f"loss weighting {name!r} is unknown; use one of {', '.join(WEIGHTINGS)}")
    signature = inspect.signature(fn)
    accepted = [p for p in signature.parameters if p != "snr"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"loss weighting {name!r} got unknown parameter(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )
    missing = [
        p for p in accepted
        if signature.parameters[p].default is inspect.Parameter.empty and p not in params
    ]
    if missing:
        raise ConfigError(f"loss weighting {name!r} needs parameter(s) {', '.join(missing)}")
    return fn(snr_t, **params)
