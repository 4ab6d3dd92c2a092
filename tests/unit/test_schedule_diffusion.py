"""Noise schedules, the Gaussian forward process, per-sample losses, respacing and samplers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import randomize_
from trainers.diffusion import GaussianDiffusion, alphas_cumprod, betas_for, log_snr, sample, snr
from trainers.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl
from trainers.diffusion.sampling import guided_eps_fn
from trainers.errors import ConfigError
from trainers.models import DiT, DiTSpec


def _cos_f(u):
    return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("T", [1000, 250, 100])
def test_linear_betas_closed_form(T: int) -> None:
    b = betas_for("linear", T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert b[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert b[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    steps = np.diff(b)
    assert np.all(steps > 0)
    np.testing.assert_allclose(steps, (b[-1] - b[0]) / (T - 1), rtol=1e-9)   # evenly spaced


def test_linear_schedule_anchor_values() -> None:
    ab = alphas_cumprod(betas_for("linear", 1000))
    s = snr("linear", 1000)
    assert s[0] == pytest.approx((1 - 1e-4) / 1e-4, rel=1e-9)          # SNR(0) = 9999
    assert ab[-1] == pytest.approx(4.035e-5, rel=2e-3)                   # DDPM's ᾱ_T ≈ 4e-5
    assert np.all(np.diff(ab) < 0) and np.all(np.diff(s) < 0)


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_betas_closed_form(T: int) -> None:
    b = betas_for("cosine", T)
    t = np.arange(T, dtype=np.float64)
    expected = np.minimum(1 - _cos_f((t + 1) / T) / _cos_f(t / T), 0.999)
    np.testing.assert_allclose(b, expected, rtol=1e-12)
    assert b[0] == pytest.approx(1 - _cos_f(1 / T) / _cos_f(0.0), rel=1e-12)
    assert b[-1] == 0.999                                                 # f(1) = 0: capped
    assert np.all(np.diff(b) >= 0) and b.max() <= 0.999
    # Without the cap ᾱ telescopes to f((t+1)/T) / f(0).
    ab = alphas_cumprod(b)
    uncapped = expected < 0.999
    np.testing.assert_allclose(ab[uncapped], (_cos_f((t + 1) / T) / _cos_f(0.0))[uncapped], rtol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alphas_cumprod_and_snr(schedule: str) -> None:
    T = 200
    b = betas_for(schedule, T)
    ab = alphas_cumprod(b)
    manual = np.empty(T)
    acc = 1.0
    for i, beta in enumerate(b):
        acc *= 1.0 - beta
        manual[i] = acc
    np.testing.assert_allclose(ab, manual, rtol=1e-12)
    np.testing.assert_allclose(snr(schedule, T), ab / (1 - ab), rtol=1e-12)
    np.testing.assert_allclose(log_snr(schedule, T), np.log(ab / (1 - ab)), rtol=1e-12)
    d = GaussianDiffusion.from_config(schedule, T, learn_sigma=True)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ab, rtol=1e-12)
    np.testing.assert_allclose(d.snr.numpy(), ab / (1 - ab), rtol=1e-12)
    # Posterior variance β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) (DDPM eq. 7).
    ab_prev = np.append(1.0, ab[:-1])
    np.testing.assert_allclose(d.post_var.numpy(), b * (1 - ab_prev) / (1 - ab), rtol=1e-12)


def test_schedule_errors() -> None:
    with pytest.raises(ConfigError, match="diffusion.schedule"):
        betas_for("quadratic", 100)
    with pytest.raises(ConfigError, match="at least 2"):
        betas_for("linear", 1)


# ------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("t_value", [0, 10, 50, 99])
def test_q_sample_moments(t_value: int) -> None:
    d = GaussianDiffusion.from_config("linear", 100, learn_sigma=False)
    gen = torch.Generator().manual_seed(t_value)
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    m = 20000
    eps = torch.randn((m, 1, 4, 4), generator=gen)
    t = torch.full((m,), t_value, dtype=torch.long)
    xt = d.q_sample(x0.expand(m, -1, -1, -1), t, eps)
    ab = float(d.alphas_cumprod[t_value])
    var = 1 - ab
    tol_mean = 5 * math.sqrt(var / m)
    torch.testing.assert_close(xt.mean(0), math.sqrt(ab) * x0[0], atol=tol_mean, rtol=0)
    torch.testing.assert_close(xt.var(0), torch.full_like(x0[0], var), atol=5 * var * math.sqrt(2 / m), rtol=0)


def _expected_vb(d: GaussianDiffusion, eps_hat, v, x0, xt, t) -> torch.Tensor:
    """The VB term from the closed-form posterior, computed independently in float64."""
    b = d.betas.numpy()
    ab = d.alphas_cumprod.numpy()
    ab_prev = np.append(1.0, ab[:-1])
    out = []
    for i, ti in enumerate(t.tolist()):
        c1 = b[ti] * math.sqrt(ab_prev[ti]) / (1 - ab[ti])
        c2 = (1 - ab_prev[ti]) * math.sqrt(1 - b[ti]) / (1 - ab[ti])
        post_var = b * (1 - ab_prev) / (1 - ab)
        min_log = math.log(post_var[1] if ti == 0 else post_var[ti])
        max_log = math.log(b[ti])
        x0d, xtd = x0[i].double(), xt[i].double()
        x0_hat = (xtd - math.sqrt(1 - ab[ti]) * eps_hat[i].double()) / math.sqrt(ab[ti])
        true_mean = c1 * x0d + c2 * xtd
        model_mean = c1 * x0_hat + c2 * xtd
        frac = (v[i].double() + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
        if ti == 0:
            nll = -discretized_gaussian_log_likelihood(x0d, model_mean, 0.5 * model_logvar)
            out.append(nll.mean() / math.log(2))
        else:
            kl = normal_kl(true_mean, torch.full_like(true_mean, min_log), model_mean, model_logvar)
            out.append(kl.mean() / math.log(2))
    return torch.stack(out).float()


def test_training_losses_learn_sigma() -> None:
    d = GaussianDiffusion.from_config("linear", 100, learn_sigma=True)
    gen = torch.Generator().manual_seed(0)
    n, c = 6, 2
    x0 = torch.rand((n, c, 4, 4), generator=gen) * 2 - 1
    eps = torch.randn((n, c, 4, 4), generator=gen)
    t = torch.tensor([0, 0, 1, 17, 50, 99])
    xt = d.q_sample(x0, t, eps)
    out = (torch.randn((n, 2 * c, 4, 4), generator=gen) * 0.5).requires_grad_(True)
    terms = d.training_losses(out, x0, xt, t, eps)
    assert terms.mse.shape == (n,) and terms.vb.shape == (n,)
    assert torch.isfinite(terms.vb).all() and (terms.vb > 0).all()
    torch.testing.assert_close(terms.mse, ((eps - out[:, :c]) ** 2).mean(dim=(1, 2, 3)))
    expected = _expected_vb(d, out[:, :c].detach(), out[:, c:].detach(), x0, xt, t)
    torch.testing.assert_close(terms.vb, expected, rtol=1e-4, atol=1e-5)
    # t == 0 uses the decoder NLL, not the KL: the KL formula gives a different number there.
    kl_at_0 = _expected_vb(d, out[:1, :c].detach(), out[:1, c:].detach(), x0[:1], xt[:1], torch.tensor([1]))
    assert not torch.allclose(terms.vb[:1], kl_at_0)
    # vb trains only the variance channels (stop-gradient on the mean, as in DiT).
    terms.vb.sum().backward()
    assert torch.count_nonzero(out.grad[:, :c]) == 0
    assert torch.count_nonzero(out.grad[:, c:]) > 0


def test_training_losses_fixed_sigma() -> None:
    d = GaussianDiffusion.from_config("cosine", 100, learn_sigma=False)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand((5, 3, 4, 4), generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 3, 30, 60, 99])
    xt = d.q_sample(x0, t, eps)
    terms = d.training_losses(eps.clone(), x0, xt, t, eps)             # perfect ε prediction
    assert terms.mse.shape == (5,) and terms.vb.shape == (5,)
    assert torch.count_nonzero(terms.mse) == 0 and torch.count_nonzero(terms.vb) == 0
    terms = d.training_losses(torch.zeros_like(eps), x0, xt, t, eps)
    torch.testing.assert_close(terms.mse, (eps ** 2).mean(dim=(1, 2, 3)))


# ------------------------------------------------------------------------------- respacing
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 7, 25, 100, 500])
def test_respacing_keeps_original_timesteps(schedule: str, steps: int) -> None:
    d = GaussianDiffusion.from_config(schedule, 100, learn_sigma=True)
    r = d.respaced(steps)
    kept = r.timestep_map.numpy()
    assert r.num_timesteps == len(kept) == min(steps, 100)
    assert np.all(np.diff(kept) > 0) and kept[-1] == 99                  # always starts from t = T−1
    if steps > 1:
        assert kept[0] == 0
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), d.alphas_cumprod.numpy()[kept], rtol=1e-9, atol=1e-15)
    # Respacing a respaced process still maps to the ORIGINAL timesteps.
    rr = r.respaced(max(1, len(kept) // 2))
    assert set(rr.timestep_map.tolist()) <= set(kept.tolist())
    np.testing.assert_allclose(rr.alphas_cumprod.numpy(), d.alphas_cumprod.numpy()[rr.timestep_map.numpy()],
                               rtol=1e-9, atol=1e-15)


# -------------------------------------------------------------------------------- sampling
def _model(num_classes: int, learn_sigma: bool = True, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    spec = DiTSpec(image_size=8, channels=1, patch=2, hidden=32, depth=2, heads=2,
                   num_classes=num_classes, learn_sigma=learn_sigma)
    return randomize_(DiT(spec), seed=seed, std=0.05).eval()


class _Spy(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x, t, y=None):
        self.seen.append(t.clone())
        return self.inner(x, t, y)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_shapes_determinism_and_original_timesteps(sampler: str) -> None:
    d = GaussianDiffusion.from_config("linear", 100, learn_sigma=True)
    model = _Spy(_model(num_classes=0))
    shape = (3, 1, 8, 8)

    def draw(seed: int) -> torch.Tensor:
        return sample(model, d, shape, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(seed))

    a = draw(0)
    assert a.shape == shape and torch.isfinite(a).all()
    assert a.min() >= -1 and a.max() <= 1
    seen = torch.stack(model.seen)                                       # [steps, N]
    expected = d.respaced(6).timestep_map.flip(0)
    assert torch.equal(seen[:, 0], expected) and expected[0] == 99      # original t, descending
    assert torch.equal(a, draw(0))
    assert not torch.allclose(a, draw(1))


def test_ddim_eta_adds_per_step_noise() -> None:
    d = GaussianDiffusion.from_config("linear", 100, learn_sigma=True)
    model = _model(num_classes=0)
    # η = 0: all randomness is in x_T; η = 1 adds fresh noise at every step, so the samples differ.
    a = sample(model, d, (2, 1, 8, 8), steps=5, sampler="ddim", eta=0.0, generator=torch.Generator().manual_seed(3))
    b = sample(model, d, (2, 1, 8, 8), steps=5, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a, b)


def test_classifier_free_guidance() -> None:
    d = GaussianDiffusion.from_config("linear", 100, learn_sigma=True)
    model = _model(num_classes=4)
    y = torch.tensor([0, 1, 2, 3])
    null = 4
    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 40, 70, 99])
    eps_c, v_c = d.split_output(model(x, t, y), 1)
    eps_u, _ = d.split_output(model(x, t, torch.full_like(y, null)), 1)
    guided, v = guided_eps_fn(model, d, 1, y, null, 2.0)(x, t)
    torch.testing.assert_close(guided, eps_u + 2.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v_c, rtol=1e-5, atol=1e-5)            # variance from the conditional half
    plain, _ = guided_eps_fn(model, d, 1, y, null, 1.0)(x, t)
    torch.testing.assert_close(plain, eps_c, rtol=0, atol=0)             # scale 1 = conditional model
    assert not torch.allclose(guided, eps_c, atol=1e-4)

    def draw(guidance: float, null_class) -> torch.Tensor:
        return sample(model, d, (4, 1, 8, 8), steps=5, sampler="ddim", y=y, null_class=null_class,
                      guidance=guidance, generator=torch.Generator().manual_seed(7))

    g2 = draw(2.0, null)
    assert g2.shape == (4, 1, 8, 8) and torch.isfinite(g2).all()
    g1 = draw(1.0, null)
    assert torch.equal(g1, draw(1.0, None))                              # guidance 1 == unguided path
    assert not torch.allclose(g1, g2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_single_step_sampling_is_finite(sampler: str) -> None:
    d = GaussianDiffusion.from_config("linear", 100, learn_sigma=True)
    r = d.respaced(1)
    assert r.timestep_map.tolist() == [99] and torch.isfinite(r.post_logvar_clipped).all()
    out = sample(_model(num_classes=0), d, (2, 1, 8, 8), steps=1, sampler=sampler,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
