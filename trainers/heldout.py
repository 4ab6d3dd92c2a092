"""Held-out denoising loss per interval: how well a model does on data it never trained on.

With ``data.holdout > 0`` a fixed share of a built-in set is kept out of training; at every
checkpoint the main rank scores the EMA model on it: for each interval of the run's partition,
every held-out image is noised at a timestep drawn from that interval, with a generator seeded
once, so the same timesteps and noise are used at every checkpoint and the curve is comparable over
steps. The loss is the per-sample training loss (ε-MSE + vb, unweighted). MEME's expert
architecture search uses the expert's own interval as its objective.
"""
from __future__ import annotations

import torch

from trainers.data import ArrayDataset

__all__ = ["heldout_losses", "HELDOUT_SEED"]

HELDOUT_SEED = 12_345


@torch.no_grad()
def heldout_losses(model: torch.nn.Module, diffusion, intervals, data: ArrayDataset, device,
                   batch: int = 256) -> dict[str, float]:
    """``{"heldout/loss": mean over intervals, "heldout/interval_k": mean loss of interval k}``."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    out, total = {}, 0.0
    try:
        for k, (lo, hi) in enumerate(intervals.pairs()):
            t_all = torch.randint(lo, hi, (len(data),), generator=gen)
            eps_all = torch.randn(data.images.shape, generator=gen)
            losses = []
            for start in range(0, len(data), batch):
                x0 = data.images[start:start + batch].to(device)
                t, eps = t_all[start:start + batch].to(device), eps_all[start:start + batch].to(device)
                y = None if data.labels is None else data.labels[start:start + batch].to(device)
                xt = diffusion.q_sample(x0, t, eps)
                terms = diffusion.training_losses(model(xt, t, y).float(), x0, xt, t, eps)
                losses.append((terms.mse + terms.vb).cpu())
            out[f"heldout/interval_{k}"] = float(torch.cat(losses).mean())
            total += out[f"heldout/interval_{k}"]
    finally:
        model.train(was)
    out["heldout/loss"] = total / intervals.num_intervals
    return out
