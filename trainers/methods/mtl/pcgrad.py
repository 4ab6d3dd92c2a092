"""PCGrad (projecting conflicting gradients) over timestep-interval tasks.

ANT (Go et al., NeurIPS 2023, arXiv 2306.00354), method section, applying Yu et al.'s
PCGrad to the interval tasks; procedure as ANT uses it (docs/methods.md, "ANT"):

    for each task i:  g^_i <- g_i
        for j in a fresh random permutation of all tasks (i included):
            if g^_i . g_j < 0:  g^_i <- g^_i - (g^_i . g_j / ||g_j||^2) g_j     (original g_j)
    return mean_i g^_i

ANT backpropagates ``L_i / K`` per task and sums the projected gradients, i.e. the mean of the
projected gradients of the raw ``L_i``; this function takes the raw ``g_i`` and returns the mean.
The projection is branch-free (``torch.where``), so it never syncs a GPU; all tasks advance one
permutation step at a time, vectorised over the ``P`` parameters.
"""
from __future__ import annotations

import torch

from trainers.errors import ConfigError

__all__ = ["pcgrad"]


def pcgrad(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean of PCGrad-projected task gradients: ``grads [K, P]`` -> ``[P]``.

    One permutation per task is drawn with ``torch.randperm(K, generator=generator)``, in task
    order, so a seeded ``generator`` makes the result deterministic. Zero-norm ``g_j`` are skipped.
    """
    if not isinstance(grads, torch.Tensor):
        raise ConfigError(f"grads must be a torch.Tensor of shape [K, P], got {type(grads).__name__}")
    if grads.ndim != 2 or grads.shape[0] < 1 or grads.shape[1] < 1:
        raise ConfigError(f"grads must have shape [K, P] with K, P >= 1, got {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise ConfigError(f"grads must be a floating-point tensor, got dtype {grads.dtype}")
    K = grads.shape[0]
    perm_device = generator.device if generator is not None else torch.device("cpu")
    perms = torch.stack(
        [torch.randperm(K, generator=generator, device=perm_device) for _ in range(K)]
    ).to(grads.device)  # [K, K]: perms[i] = visiting order for task i
    norms_sq = (grads * grads).sum(dim=1)  # [K]
    safe_norms_sq = torch.where(norms_sq > 0, norms_sq, torch.ones_like(norms_sq))  # [K]
    projected = grads.clone()  # [K, P]
    for step in range(K):
        j = perms[:, step]  # [K]: the task each i visits at this step
        g_j = grads[j]  # [K, P] original gradients
        dots = (projected * g_j).sum(dim=1)  # [K]
        conflict = (dots < 0) & (norms_sq[j] > 0)  # [K]
        coef = torch.where(conflict, dots / safe_norms_sq[j], torch.zeros_like(dots))  # [K]
        projected = projected - coef[:, None] * g_j  # [K, P]
    return projected.mean(dim=0)  # [P]
