"""Per-sample loss weightings (docs/methods.md, "Loss weightings")."""
from __future__ import annotations

import math

import pytest
import torch

from trainers.diffusion.weighting import (
    WEIGHTINGS,
    constant_weight,
    loss_weight,
    min_snr_weight,
    p2_weight,
)
from trainers.errors import ConfigError


def _cosine_snr(T: int = 1000) -> torch.Tensor:
    """SNR(t) of the capped cosine schedule ; large t has tiny SNR."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((t + 1) / T) / f(t / T), 0.999) for t in range(T)]
    abar = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0)
    return abar / (1 - abar)


def test_min_snr_hand_values() -> None:
    snr = torch.tensor([0.0, 0.5, 5.0, 10.0, 100.0], dtype=torch.float64)
    w = min_snr_weight(snr, gamma=5.0)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 1.0, 0.5, 0.05], dtype=torch.float64))
    positive = snr[1:]
    assert torch.allclose(min_snr_weight(positive, 5.0), torch.minimum(positive, torch.tensor(5.0)) / positive)


def test_min_snr_is_one_where_snr_at_most_gamma() -> None:
    snr = torch.linspace(0.0, 3.0, 301)
    assert torch.equal(min_snr_weight(snr, 3.0), torch.ones_like(snr))
    large = torch.tensor([3.5, 7.0, 1e6])
    assert torch.all(min_snr_weight(large, 3.0) < 1)


def test_p2_hand_values() -> None:
    snr = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    assert torch.allclose(p2_weight(snr, gamma=1.0, k=1.0), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    assert torch.allclose(p2_weight(snr, gamma=0.5, k=1.0), torch.tensor([1.0, 2**-0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(p2_weight(snr, gamma=2.0, k=2.0), 1 / (2.0 + snr) ** 2)


def test_p2_gamma_zero_is_one() -> None:
    snr = torch.tensor([0.0, 0.1, 10.0, 1e8])
    assert torch.equal(p2_weight(snr, gamma=0.0, k=1.0), torch.ones(4))


def test_constant() -> None:
    snr = torch.tensor([0.0, 2.0, 1e9], dtype=torch.float16)
    w = constant_weight(snr)
    assert torch.equal(w, torch.ones(3, dtype=torch.float16))
    assert w.dtype == torch.float16


def test_finite_at_zero_and_across_schedule() -> None:
    snr = _cosine_snr()
    zero = torch.zeros(4)
    for name, params in (("constant", {}), ("min_snr", {"gamma": 5.0}), ("p2", {"gamma": 1.0, "k": 1.0})):
        assert torch.all(torch.isfinite(loss_weight(name, zero, **params)))
        w = loss_weight(name, snr, **params)
        assert torch.all(torch.isfinite(w)) and torch.all(w > 0) and torch.all(w <= 1)
        assert w.shape == snr.shape and w.dtype == snr.dtype
    assert torch.equal(min_snr_weight(zero, 5.0), torch.ones(4))
    assert torch.equal(p2_weight(zero, gamma=1.0, k=1.0), torch.ones(4))


def test_dispatch_matches_functions() -> None:
    snr = torch.tensor([0.2, 4.0, 50.0])
    assert torch.equal(loss_weight("constant", snr), constant_weight(snr))
    assert torch.equal(loss_weight("min_snr", snr, gamma=5.0), min_snr_weight(snr, 5.0))
    assert torch.equal(loss_weight("p2", snr, gamma=1.0, k=1.0), p2_weight(snr, 1.0, 1.0))
    assert torch.equal(loss_weight("p2", snr, gamma=1.0), p2_weight(snr, 1.0, 1.0))  # k defaults to 1
    assert set(WEIGHTINGS) == {"constant", "min_snr", "p2"}


def test_dispatch_errors() -> None:
    snr = torch.tensor([1.0])
    with pytest.raises(ConfigError, match="'min_snr_5' is unknown"):
        loss_weight("min_snr_5", snr)
    with pytest.raises(ConfigError, match="needs parameter.*gamma"):
        loss_weight("min_snr", snr)
    with pytest.raises(ConfigError, match="unknown parameter.*k"):
        loss_weight("min_snr", snr, gamma=5.0, k=1.0)
    with pytest.raises(ConfigError, match="unknown parameter.*gamma"):
        loss_weight("constant", snr, gamma=5.0)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: min_snr_weight(s, 0.0), "gamma"),
        (lambda s: min_snr_weight(s, -1.0), "gamma"),
        (lambda s: min_snr_weight(s, float("nan")), "gamma"),
        (lambda s: p2_weight(s, -0.5, 1.0), "gamma"),
        (lambda s: p2_weight(s, 1.0, 0.0), "k"),
        (lambda s: min_snr_weight(torch.tensor([1, 2]), 5.0), "snr"),
        (lambda s: constant_weight([1.0]), "snr"),
    ],
)
def test_parameter_validation(call, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        call(torch.tensor([1.0]))
