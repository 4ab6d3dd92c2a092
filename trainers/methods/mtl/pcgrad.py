"""PCGrad (projecting conflicting gradients) over timestep-interval tasks.

ANT (Go et al., NeurIPS 2023, arXiv 2306.00354), method section, applying Yu et al.'s
PCGrad to the interval tasks; procedure as ANT uses it (docs/methods.md, "ANT"):

    for each task i:  g^_i <- g_i
        for j in a fresh random permutation of all tasks (i included):
            if g^_i . g_j < 0:  g^_i <- g^_i - (g^_i . g_j / ||g_j||^2) g_j     (original g_j)
    return mean_i g^_i

ANT backpropagates ``L_i / K`` per task and sums the projected gradients, i.e. the mean of the
projected gradients of the raw ``L_i``; this function takes the raw ``g_i`` and returns the mean.

Every projection subtracts a multiple of an ORIGINAL ``g_j``, so each projected gradient is a
combination ``g^_i = Σ_m A_im g_m`` and every dot product the procedure needs is an entry of
``A·G`` with the Gram matrix ``G = g gᵀ`` [K, K]. :func:`pcgrad_weights` runs the procedure on
``G`` alone and returns ``w = mean_i A_i`` [K], so the result is ``Σ_m w_m g_m``: the trainer
never materialises the [K, P] matrix (it accumulates ``G`` layer by layer and forms the weighted
sum as one weighted backward; ``trainers/methods/grouped_grads.py``). The projection is
branch-free (``torch.where``); all tasks advance one permutation step at a time.
"""
from __future__ import annotations

import torch

from trainers.errors import ConfigError

__all__ = ["pcgrad", "pcgrad_weights"]


def pcgrad(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean of PCGrad-projected task gradients: ``grads [K, P]`` -> ``[P]``.

    One permutation per task is drawn with ``torch.randperm(K, generator=generator)``, in task
    order, so a seeded ``generator`` makes the result deterministic. Zero-norm ``g_j`` are skipped.
    """
    _check(grads, "grads", "[K, P]")
    weights = pcgrad_weights(grads.double() @ grads.double().T, generator)
    return (weights.to(grads.dtype) @ grads)


def pcgrad_weights(gram: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``w [K]`` with ``pcgrad(g) = Σ_m w_m g_m``, from the Gram matrix ``gram = g gᵀ`` [K, K]
    (same permutations, drawn the same way, as :func:`pcgrad`). Computed in float64."""
    _check(gram, "gram", "[K, K]")
    if gram.shape[0] != gram.shape[1]:
        raise ConfigError(f"gram must be square [K, K], got {tuple(gram.shape)}")
    G = gram.detach().double().cpu()
    K = G.shape[0]
    perm_device = generator.device if generator is not None else torch.device("cpu")
    perms = torch.stack([torch.randperm(K, generator=generator, device=perm_device) for _ in range(K)]).cpu()
    norms_sq = torch.diagonal(G)                                                    # [K]
    safe_norms_sq = torch.where(norms_sq > 0, norms_sq, torch.ones_like(norms_sq))
    rows = torch.arange(K)
    A = torch.eye(K, dtype=torch.float64)                                           # g^ = A g
    for step in range(K):
        j = perms[:, step]                                                          # [K]: task i visits j_i
        dots = (A @ G)[rows, j]                                                     # g^_i . g_j
        conflict = (dots < 0) & (norms_sq[j] > 0)
        coef = torch.where(conflict, dots / safe_norms_sq[j], torch.zeros_like(dots))
        A[rows, j] -= coef
    return A.mean(dim=0).to(gram.device)                                            # [K]


def _check(x: torch.Tensor, name: str, shape: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ConfigError(f"{name} must have shape {shape} with K, P >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
