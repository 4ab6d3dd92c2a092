"""Uncertainty Weighting over timestep intervals ("ANT-UW").

ANT (Go et al., NeurIPS 2023, arXiv 2306.00354), method section, applying Kendall et al.'s
uncertainty weighting to the interval tasks; loss form as ANT uses it (docs/methods.md, "ANT"):

    L = sum_i 1/2 * ( exp(-s_i) * L_i / K + s_i ),     s_i = log sigma_i^2 (init 0)

The 1/K is inside the weighting. Its minimiser in ``s`` is ``exp(s_i) = L_i / K``
(:func:`uw_optimum`), so the effective weight is proportional to ``1 / L_i``. The logged weights
are ``1/2 * exp(-s_i)`` (:func:`uw_weights`).

Active mask (our extension, for i.i.d. timestep sampling where an interval can be empty in a
batch): inactive intervals contribute nothing, neither the weighted loss nor the ``s_i`` term,
so their ``s_i`` receive zero gradient; and ``K`` becomes the number of *active* intervals, so
the loss of a batch that covers every interval is unchanged and a partial batch is scaled as if
it were a full batch over the intervals it does cover.
"""
from __future__ import annotations

import torch

from trainers.errors import ConfigError

__all__ = ["uw_loss", "uw_weights", "uw_optimum"]


def _check_vector(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor of shape [K], got {type(x).__name__}")
    if x.ndim != 1 or x.numel() < 1:
        raise ConfigError(f"{name} must have shape [K] with K >= 1, got {tuple(x.shape)}")
    return x


def uw_loss(
    task_losses: torch.Tensor,
    log_vars: torch.Tensor,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar ANT-UW loss from per-interval losses ``[K]`` and learnable ``log_vars`` ``[K]``.

    ``active`` (bool ``[K]``, optional) drops intervals absent from the batch; see module doc.
    Inactive ``task_losses`` entries are replaced by 0 before use, so they may hold any finite
    placeholder (a NaN placeholder would still poison gradients upstream of this function).
    """
    _check_vector(task_losses, "task_losses")
    _check_vector(log_vars, "log_vars")
    if task_losses.shape != log_vars.shape:
        raise ConfigError(
            f"task_losses {tuple(task_losses.shape)} and log_vars {tuple(log_vars.shape)} must match"
        )
    if active is None:
        k = task_losses.numel()
        terms = torch.exp(-log_vars) * task_losses / k + log_vars  # [K]
        return 0.5 * terms.sum()
    _check_vector(active, "active")
    if active.dtype != torch.bool or active.shape != task_losses.shape:
        raise ConfigError(f"active must be a bool tensor of shape {tuple(task_losses.shape)}")
    active = active.to(task_losses.device)
    k = active.sum().clamp_min(1).to(task_losses.dtype)  # number of active intervals, no sync
    losses = torch.where(active, task_losses, torch.zeros_like(task_losses))  # [K]
    terms = torch.exp(-log_vars) * losses / k + log_vars  # [K]
    return 0.5 * torch.where(active, terms, torch.zeros_like(terms)).sum()


def uw_weights(log_vars: torch.Tensor) -> torch.Tensor:
    """Logged weights ``1/2 * exp(-s_i)`` (detached), shape ``[K]``."""
    _check_vector(log_vars, "log_vars")
    return 0.5 * torch.exp(-log_vars.detach())


def uw_optimum(task_losses: torch.Tensor, K: int) -> torch.Tensor:
    """Closed-form minimiser ``s_i* = log(L_i / K)`` of :func:`uw_loss` for fixed losses."""
    _check_vector(task_losses, "task_losses")
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ConfigError(f"K must be a positive int (number of intervals), got {K!r}")
    if not bool(torch.all(task_losses > 0)):
        raise ConfigError("task_losses must be strictly positive for the UW optimum log(L_i / K)")
    return torch.log(task_losses.detach() / K)
