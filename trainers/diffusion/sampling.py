"""Ancestral DDPM (Ho et al. 2020, Alg. 2) and DDIM (Song et al. 2021, eq. 12) sampling with
timestep respacing and classifier-free guidance (Ho & Salimans 2022, eq. 6).

The model always receives the ORIGINAL timestep (``timestep_map``), which DTR masks rely on.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainers.diffusion.gaussian import GaussianDiffusion

__all__ = ["sample", "guided_eps_fn"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], tuple]


def guided_eps_fn(model: torch.nn.Module, diffusion: GaussianDiffusion, channels: int,
                  y: torch.Tensor | None, null_class: int | None, guidance: float) -> EpsFn:
    """Return f(x, t_orig) -> (eps, v) with classifier-free guidance when ``guidance != 1``."""
    use_cfg = y is not None and null_class is not None and guidance != 1.0

    def fn(x: torch.Tensor, t: torch.Tensor):
        if not use_cfg:
            return diffusion.split_output(model(x, t, y), channels)
        y_null = torch.full_like(y, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))    # [2N, ...]
        eps, v = diffusion.split_output(out, channels)
        eps_c, eps_u = eps.chunk(2)
        v = v.chunk(2)[0] if v is not None else None
        return eps_u + guidance * (eps_c - eps_u), v
    return fn


@torch.no_grad()
def sample(model: torch.nn.Module, diffusion: GaussianDiffusion, shape: tuple[int, ...], *,
           steps: int, sampler: str = "ddim", y: torch.Tensor | None = None,
           null_class: int | None = None, guidance: float = 1.0, eta: float = 0.0,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           clip_x0: bool = True) -> torch.Tensor:
    """Draw samples of ``shape`` with ``steps`` respaced steps; ``clip_x0`` clamps the predicted
    x0 (and the result) to [−1, 1], which suits pixel data and not latents."""
    spaced = diffusion.respaced(steps)
    eps_fn = guided_eps_fn(model, spaced, shape[1], y, null_class, guidance)
    x = torch.randn(shape, generator=generator, device="cpu").to(device)
    tmap = spaced.timestep_map.to(device)
    for i in reversed(range(spaced.num_timesteps)):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        eps, v = eps_fn(x, tmap[t])
        eps = eps.float()
        x0 = spaced.pred_x0(x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        noise = torch.randn(shape, generator=generator, device="cpu").to(device)
        if sampler == "ddpm":
            mean, _ = spaced.q_posterior(x0, x, t)
            logvar = spaced.model_logvar(v.float() if v is not None else None, t, x.ndim)
            x = mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * logvar) * noise
        else:
            eps = (spaced.gather("sqrt_recip_ab", t, x.ndim) * x - x0) / spaced.gather("sqrt_recipm1_ab", t, x.ndim)
            ab = spaced.gather("alphas_cumprod", t, x.ndim)
            ab_prev = spaced.gather("alphas_cumprod_prev", t, x.ndim)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            mean = x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev - sigma ** 2).clamp(min=0)) * eps
            x = mean + (0.0 if i == 0 else 1.0) * sigma * noise
    return x.clamp(-1.0, 1.0) if clip_x0 else x
