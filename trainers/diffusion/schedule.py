"""Noise schedules (DDPM, Ho et al. 2020; cosine: Nichol & Dhariwal 2021, eq. 17).

``linear``: β_t = linspace(1e-4·1000/T, 0.02·1000/T, T). ``cosine``: f(u) = cos((u+s)/(1+s)·π/2)²
with s = 0.008, β_t = min(1 − f((t+1)/T)/f(t/T), 0.999). ᾱ_t = Π_{s≤t}(1−β_s), SNR(t) = ᾱ_t/(1−ᾱ_t).
All in float64 (docs/methods.md, "Shared substrate"), t = 0..T−1.
"""
from __future__ import annotations

import math

import numpy as np

from trainers.errors import ConfigError

__all__ = ["betas_for", "alphas_cumprod", "snr", "log_snr"]


def betas_for(schedule: str, steps: int) -> np.ndarray:
    """β_t for t = 0..T−1 as float64."""
    if steps < 2:
        raise ConfigError(f"diffusion.steps: need at least 2 timesteps, got {steps}")
    if schedule == "linear":
        scale = 1000.0 / steps
        return np.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=np.float64)
    if schedule == "cosine":
        def f(u: np.ndarray) -> np.ndarray:
            return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        t = np.arange(steps, dtype=np.float64)
        return np.minimum(1.0 - f((t + 1) / steps) / f(t / steps), 0.999)
    raise ConfigError(f"diffusion.schedule: {schedule!r} is not one of 'linear', 'cosine'")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


def snr(schedule: str, steps: int) -> np.ndarray:
    ab = alphas_cumprod(betas_for(schedule, steps))
    return ab / (1.0 - ab)


def log_snr(schedule: str, steps: int) -> np.ndarray:
    return np.log(snr(schedule, steps))
