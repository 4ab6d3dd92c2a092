"""Denoising Task Routing (DTR) channel masks — pure functions.

Park et al., "Denoising Task Routing for Diffusion Models", ICLR 2024 (arXiv 2310.07138),
docs/methods.md, "DTR". Each routing task ``t ∈ {0..T−1}`` activates a sliding window of channels::

    C_β    = ⌊β·C⌋                                  # channels active per task
    s(t)   = round( (t/(T−1))^α · (C − C_β) )       # window start
    m_t[c] = 1  iff  s(t) ≤ c < s(t) + C_β

Conventions resolved here (the paper leaves them open):

* ``round`` is round-half-to-even (``torch.round`` on float64), which is also what Python's
  built-in ``round`` does. Ties are rare (they need ``(t/(T−1))^α·(C−C_β)`` to land exactly on
  ``k + 0.5``).
* ``⌊β·C⌋`` is taken with a 1e-9 tolerance, so a ratio whose decimal product is an integer
  (``0.29 · 100``) gives that integer despite binary rounding (``28.999999999999996``).
* ``num_tasks == 1`` has no ``t/(T−1)``; the single task gets ``s = 0``.
* Masks are float32 0/1 so they can multiply activations directly; ``β = 1`` gives exact ones.

The R-TR control (:func:`random_routing_masks`) gives each task a fixed random subset of ``C_β``
channels drawn from a seeded ``torch.Generator``.
"""
from __future__ import annotations

import math

import torch

from trainers.errors import ConfigError

__all__ = [
    "active_channel_count",
    "window_starts",
    "routing_masks",
    "random_routing_masks",
    "routing_task_index",
    "shared_channels",
]

_FLOOR_TOLERANCE = 1e-9


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}; set a positive count")


def active_channel_count(channels: int, active_ratio: float) -> int:
    """``C_β = ⌊β·C⌋``, the number of channels every task activates (validated, >= 1)."""
    _check_positive_int("channels", channels)
    if isinstance(active_ratio, bool) or not isinstance(active_ratio, (int, float)):
        raise ConfigError(f"active_ratio must be a number in (0, 1], got {active_ratio!r}")
    if not (0.0 < active_ratio <= 1.0):
        raise ConfigError(f"active_ratio must be in (0, 1], got {active_ratio}; use e.g. 0.8")
    count = math.floor(active_ratio * channels + _FLOOR_TOLERANCE)
    if count < 1:
        raise ConfigError(
            f"active_ratio={active_ratio} activates no channel of {channels}; "
            f"raise active_ratio to at least {1.0 / channels:.6g}"
        )
    return min(count, channels)


def window_starts(num_tasks: int, channels: int, active_ratio: float, alpha: float) -> torch.Tensor:
    """Window start ``s(t)`` per task: int64 ``[num_tasks]``, values in ``[0, C−C_β]``."""
    _check_positive_int("num_tasks", num_tasks)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}; use e.g. 4.0")
    if alpha <= 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}; use e.g. 4.0 (1.0 = linear slide)")
    slack = channels - active_channel_count(channels, active_ratio)  # C − C_β
    if num_tasks == 1:
        return torch.zeros(1, dtype=torch.int64)
    u = torch.arange(num_tasks, dtype=torch.float64) / (num_tasks - 1)  # [T] in [0, 1]
    return torch.round(u.pow(float(alpha)) * slack).to(torch.int64)  # [T], half to even


def routing_masks(num_tasks: int, channels: int, active_ratio: float, alpha: float) -> torch.Tensor:
    """DTR masks, float32 0/1 of shape ``[num_tasks, channels]`` (docs/methods.md, "DTR").

    Row ``t`` is ones on ``[s(t), s(t)+C_β)``; every row sums to ``⌊β·C⌋``.
    """
    width = active_channel_count(channels, active_ratio)
    start = window_starts(num_tasks, channels, active_ratio, alpha).unsqueeze(1)  # [T, 1]
    c = torch.arange(channels, dtype=torch.int64).unsqueeze(0)  # [1, C]
    return ((c >= start) & (c < start + width)).to(torch.float32)  # [T, C]


def random_routing_masks(
    num_tasks: int, channels: int, active_ratio: float, seed: int
) -> torch.Tensor:
    """R-TR control: each task keeps a fixed random subset of ``C_β`` channels.

    Float32 0/1 ``[num_tasks, channels]``; the same ``seed`` gives the same masks (CPU generator).
    """
    _check_positive_int("num_tasks", num_tasks)
    width = active_channel_count(channels, active_ratio)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(num_tasks, channels, generator=gen, dtype=torch.float64)  # [T, C]
    chosen = scores.argsort(dim=1)[:, :width]  # [T, C_β] distinct channel ids per row
    masks = torch.zeros(num_tasks, channels, dtype=torch.float32)  # [T, C]
    masks.scatter_(1, chosen, 1.0)
    return masks


def routing_task_index(t: torch.Tensor, num_timesteps: int, num_tasks: int) -> torch.Tensor:
    """Map original timesteps ``0..T−1`` to routing task ids ``⌊t·num_tasks/num_timesteps⌋``.

    Identity when ``num_tasks == num_timesteps``. ``t`` must hold *original* (not respaced)
    timesteps; values are not range-checked here, to avoid a device sync in the forward pass.
    """
    _check_positive_int("num_timesteps", num_timesteps)
    _check_positive_int("num_tasks", num_tasks)
    if num_tasks > num_timesteps:
        raise ConfigError(
            f"num_tasks={num_tasks} exceeds num_timesteps={num_timesteps}; "
            "use at most one routing task per timestep"
        )
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ConfigError("t must be an integer tensor of timesteps; pass a LongTensor")
    t = t.long()
    if num_tasks == num_timesteps:
        return t
    return torch.div(t * num_tasks, num_timesteps, rounding_mode="floor")  # [N]


def shared_channels(masks: torch.Tensor, t1: int, t2: int) -> int:
    """Number of channels active for both task ``t1`` and task ``t2`` in a ``[T, C]`` mask table."""
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2:
        raise ConfigError("masks must be a [num_tasks, channels] tensor; use routing_masks")
    num_tasks = masks.shape[0]
    for name, idx in (("t1", t1), ("t2", t2)):
        if isinstance(idx, bool) or not isinstance(idx, int) or not (0 <= idx < num_tasks):
            raise ConfigError(f"{name} must be an integer in [0, {num_tasks}), got {idx!r}")
    both = (masks[t1] != 0) & (masks[t2] != 0)  # [C]
    return int(both.sum().item())
