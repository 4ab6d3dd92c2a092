"""Task affinity between denoising tasks (ANT, arXiv 2306.00354; docs/methods.md, "Intervals").

TAS[t1, t2] = cos(g_{t1}, g_{t2}), where g_t is the gradient of the loss at a fixed timestep t
accumulated over a fixed data subset (fresh ε per batch, seeded), flattened over all parameters,
averaged over checkpoints. Practical shortcuts (ours, not the paper's), both selectable:

* a timestep grid (every ``stride``-th t) with bilinear interpolation of the cosine matrix to T×T;
* a seeded count-sketch projection of each gradient to ``dim`` coordinates (bucket + random sign
  per parameter; inner products are preserved in expectation), O(P) memory instead of P×dim.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from trainers.diffusion import GaussianDiffusion

__all__ = ["timestep_grid", "CountSketch", "timestep_gradients", "cosine_matrix", "interpolate_matrix"]


def timestep_grid(num_timesteps: int, stride: int) -> np.ndarray:
    """0, stride, 2·stride, …, always ending at T−1."""
    grid = np.arange(0, num_timesteps, max(1, stride))
    return grid if grid[-1] == num_timesteps - 1 else np.append(grid, num_timesteps - 1)


class CountSketch:
    """Seeded count sketch R^P -> R^dim; ``dim = 0`` keeps the full gradient."""

    def __init__(self, num_params: int, dim: int, seed: int):
        self.dim = dim
        if dim > 0:
            g = torch.Generator().manual_seed(seed)
            self.bucket = torch.randint(dim, (num_params,), generator=g)
            self.sign = torch.randint(0, 2, (num_params,), generator=g).float() * 2 - 1

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        if self.dim <= 0:
            return flat
        return torch.zeros(self.dim, dtype=flat.dtype).index_add(0, self.bucket, self.sign * flat)


def timestep_gradients(model: torch.nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor,
                       y: Optional[torch.Tensor], timesteps: list[int], *, batch: int, seed: int,
                       sketch: CountSketch) -> torch.Tensor:
    """[len(timesteps), dim] sketched gradients of the mean per-sample loss at each fixed t."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for t_value in timesteps:
        grads = [torch.zeros_like(p) for p in params]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(t_value))
        for start in range(0, len(x0), batch):
            xb = x0[start:start + batch]
            yb = None if y is None else y[start:start + batch]
            t = torch.full((len(xb),), int(t_value), dtype=torch.long)
            eps = torch.randn(xb.shape, generator=gen)
            xt = diffusion.q_sample(xb, t, eps)
            terms = diffusion.training_losses(model(xt, t, yb), xb, xt, t, eps)
            loss = (terms.mse + terms.vb).sum() / len(x0)
            for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc.add_(g)
        rows.append(sketch(torch.cat([g.reshape(-1) for g in grads])))
    return torch.stack(rows)


def cosine_matrix(grads: torch.Tensor) -> np.ndarray:
    """[n, D] -> [n, n] cosine similarities (float64)."""
    g = grads.double()
    g = g / g.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return (g @ g.T).numpy()


def interpolate_matrix(grid: np.ndarray, values: np.ndarray, num_timesteps: int) -> np.ndarray:
    """Bilinear interpolation of a grid×grid matrix to T×T."""
    t = np.arange(num_timesteps, dtype=np.float64)
    rows = np.stack([np.interp(t, grid, values[:, j]) for j in range(len(grid))], axis=1)   # [T, n]
    return np.stack([np.interp(t, grid, rows[i]) for i in range(num_timesteps)])             # [T, T]
