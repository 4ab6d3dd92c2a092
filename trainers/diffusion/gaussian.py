"""Gaussian diffusion: forward process, posterior, per-sample training losses.

DDPM (Ho et al. 2020): x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (eq. 4), ε-prediction loss ‖ε − ε_θ‖² (eq. 14).
Learned variance (Nichol & Dhariwal 2021, eq. 15): log Σ = v log β_t + (1−v) log β̃_t with the
hybrid loss L_simple + L_vb, where L_vb trains only Σ (stop-gradient on the mean), as DiT does.
Losses stay per-sample (``[N]``) here; the training step reduces them (docs/architecture.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trainers.diffusion.schedule import alphas_cumprod, betas_for

__all__ = ["GaussianDiffusion", "LossTerms", "normal_kl", "discretized_gaussian_log_likelihood"]


@dataclass
class LossTerms:
    """Per-sample loss terms, each ``[N]``."""
    mse: torch.Tensor
    vb: torch.Tensor


def _gather(arr: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``arr[t]`` as float, shaped to broadcast over an ``ndim``-dimensional batch. ``arr`` must
    already be on ``t``'s device (:meth:`GaussianDiffusion.on`): a copy here would wait for the
    device on every call."""
    out = arr[t].float()                                     # [N]
    return out.reshape(-1, *([1] * (ndim - 1)))              # [N, 1, 1, 1]


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log p(x) for x in [−1, 1] quantised to 256 levels (DDPM §3.3), elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Schedule tensors plus the math of q and p. ``timestep_map`` supports respacing."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool, timestep_map: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        ab = alphas_cumprod(betas)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        t64 = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        self.betas = t64(betas)
        self.alphas_cumprod = t64(ab)
        self.alphas_cumprod_prev = t64(ab_prev)
        self.sqrt_ab = t64(np.sqrt(ab))
        self.sqrt_one_minus_ab = t64(np.sqrt(1.0 - ab))
        self.sqrt_recip_ab = t64(np.sqrt(1.0 / ab))
        self.sqrt_recipm1_ab = t64(np.sqrt(1.0 / ab - 1.0))
        self.post_var = t64(post_var)
        # β̃_0 = 0: use β̃_1 at t = 0 (improved DDPM); a one-step process has only β_0.
        clipped = np.append(post_var[1], post_var[1:]) if len(betas) > 1 else betas
        self.post_logvar_clipped = t64(np.log(clipped))
        self.post_coef1 = t64(betas * np.sqrt(ab_prev) / (1.0 - ab))
        self.post_coef2 = t64((1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab))
        self.log_betas = t64(np.log(betas))
        self.snr = t64(ab / (1.0 - ab))
        tmap = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        self.timestep_map = torch.from_numpy(tmap.astype(np.int64))
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """Schedule array ``name`` on ``device``, copied once and kept (the step reads several
        arrays every step; copying them each time would synchronise with the device)."""
        arr, device = getattr(self, name), torch.device(device)
        if arr.device == device:
            return arr
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = arr.to(device)
        return self._on_device[key]

    def gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Schedule array ``name`` at timesteps ``t`` (float, broadcastable over ``ndim`` dims)."""
        return _gather(self.on(name, t.device), t, ndim)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_on_device"] = {}                  # device copies stay with the process that made them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"_on_device": {}, **state})

    @classmethod
    def from_config(cls, schedule: str, steps: int, learn_sigma: bool) -> "GaussianDiffusion":
        return cls(betas_for(schedule, steps), learn_sigma)

    def respaced(self, num_steps: int) -> "GaussianDiffusion":
        """Evenly spaced subset of timesteps (improved DDPM §4); model sees original t."""
        num_steps = max(1, min(num_steps, self.num_timesteps))
        if num_steps == 1:                       # one step starts from pure noise: t = T−1
            use = np.array([self.num_timesteps - 1], dtype=np.int64)
        else:
            use = np.unique(np.round(np.linspace(0, self.num_timesteps - 1, num_steps)).astype(np.int64))
        ab = self.alphas_cumprod.numpy()[use]
        betas = 1.0 - ab / np.append(1.0, ab[:-1])
        return GaussianDiffusion(betas, self.learn_sigma, self.timestep_map.numpy()[use])

    # -- forward process -------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.gather("sqrt_ab", t, x0.ndim) * x0 + self.gather("sqrt_one_minus_ab", t, x0.ndim) * eps

    def q_posterior(self, x0, xt, t):
        mean = self.gather("post_coef1", t, xt.ndim) * x0 + self.gather("post_coef2", t, xt.ndim) * xt
        return mean, self.gather("post_logvar_clipped", t, xt.ndim)

    def pred_x0(self, xt, t, eps):
        return self.gather("sqrt_recip_ab", t, xt.ndim) * xt - self.gather("sqrt_recipm1_ab", t, xt.ndim) * eps

    def split_output(self, out: torch.Tensor, channels: int):
        """Model output -> (eps, v or None)."""
        if self.learn_sigma:
            return out[:, :channels], out[:, channels:]
        return out, None

    def model_logvar(self, v: torch.Tensor | None, t: torch.Tensor, ndim: int) -> torch.Tensor:
        min_log = self.gather("post_logvar_clipped", t, ndim)
        if v is None:
            return min_log
        max_log = self.gather("log_betas", t, ndim)
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    # -- losses ------------------------------------------------------------------------------
    def training_losses(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                        t: torch.Tensor, eps: torch.Tensor) -> LossTerms:
        """Per-sample ε-MSE and (with learned Σ) the variational bound term, each ``[N]``."""
        eps_hat, v = self.split_output(out, x0.shape[1])
        mse = ((eps - eps_hat.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))         # [N]
        if v is None:
            return LossTerms(mse=mse, vb=torch.zeros_like(mse))
        vb = self._vb_terms(eps_hat.detach().float(), v.float(), x0, xt, t)              # [N]
        return LossTerms(mse=mse, vb=vb)

    def _vb_terms(self, eps_hat, v, x0, xt, t) -> torch.Tensor:
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        model_mean, _ = self.q_posterior(self.pred_x0(xt, t, eps_hat), xt, t)
        model_logvar = self.model_logvar(v, t, xt.ndim)
        dims = tuple(range(1, x0.ndim))
        kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
        nll = nll.mean(dim=dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl)
