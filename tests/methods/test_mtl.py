"""Tests for the ANT multi-task optimisers: UW, PCGrad, Nash-MTL (docs/methods.md, "ANT")."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.errors import ConfigError
from trainers.methods.mtl.nash import nash_residual, nash_weights, solve_nash
from trainers.methods.mtl.pcgrad import pcgrad
from trainers.methods.mtl.uw import uw_loss, uw_optimum, uw_weights


# ====================================================================== PCGrad
def test_pcgrad_conflicting_pair_by_hand() -> None:
    g1 = torch.tensor([1.0, 0.0])
    g2 = torch.tensor([-1.0, 1.0])  # g1 . g2 = -1 < 0
    # g1 projected off g2: g1 - (-1/2) g2 = [0.5, 0.5]; g2 projected off g1: g2 + g1 = [0, 1].
    # After those, each is orthogonal to the other original and positive on its own, so the
    # order of visits does not matter.
    for seed in range(5):
        out = pcgrad(torch.stack([g1, g2]), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, torch.tensor([0.25, 0.75]))


def test_pcgrad_non_conflicting_is_plain_mean() -> None:
    grads = torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.5, 1.0], [0.0, 1.0, 3.0]])
    assert torch.all(grads @ grads.T >= 0)
    torch.testing.assert_close(pcgrad(grads), grads.mean(0))


def test_pcgrad_identical_gradients() -> None:
    g = torch.tensor([0.3, -1.2, 2.0, 0.7])
    torch.testing.assert_close(pcgrad(g.expand(4, 4).clone()), g)


def test_pcgrad_projects_onto_originals() -> None:
    # Three tasks; g1 conflicts with g2 and g3. Sequential projection of g1 must use the
    # *original* g2, g3 (not already projected versions). Hand-compute for a fixed order.
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)

    def manual(i: int, order: list[int]) -> torch.Tensor:
        h = g[i].clone()
        for j in order:
            d = torch.dot(h, g[j])
            if d < 0:
                h = h - d / torch.dot(g[j], g[j]) * g[j]
        return h

    gen = torch.Generator().manual_seed(7)
    perms = [torch.randperm(3, generator=gen).tolist() for _ in range(3)]
    expected = torch.stack([manual(i, perms[i]) for i in range(3)]).mean(0)
    out = pcgrad(g, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, expected)
    # g1 after g2 = [0.5, 0.5, 0]; against original g3: dot -0.5 -> [0.25, 0.5, 0.25].
    torch.testing.assert_close(manual(0, [1, 2]), torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))


def test_pcgrad_deterministic_given_generator() -> None:
    grads = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    a = pcgrad(grads, generator=torch.Generator().manual_seed(3))
    b = pcgrad(grads, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == (50,)


def test_pcgrad_zero_gradient_guard() -> None:
    grads = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-1.0, 0.0]])
    out = pcgrad(grads, generator=torch.Generator().manual_seed(0))
    assert torch.all(torch.isfinite(out))


def test_pcgrad_validation() -> None:
    with pytest.raises(ConfigError):
        pcgrad(torch.zeros(4))
    with pytest.raises(ConfigError):
        pcgrad(torch.zeros(2, 3, dtype=torch.int64))


# ======================================================================= Nash
def random_gram(K: int, P: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(K, P)) * rng.uniform(0.01, 10.0, size=(K, 1))
    return G @ G.T


@pytest.mark.parametrize("K", range(2, 9))
def test_nash_residual_small_for_random_grams(K: int) -> None:
    for seed in range(5):
        gram = random_gram(K, 3 * K + 4, seed)
        alpha = nash_weights(gram)
        assert alpha is not None and alpha.shape == (K,) and np.all(alpha > 0)
        assert nash_residual(gram, alpha) < 1e-6
        np.testing.assert_allclose(gram @ alpha, 1.0 / alpha, rtol=1e-6)


def test_nash_accepts_torch_gram() -> None:
    gram = torch.from_numpy(random_gram(4, 20, 0)).float()
    alpha = nash_weights(gram)
    assert alpha is not None and nash_residual(gram, alpha) < 1e-6


def test_nash_orthogonal_closed_form() -> None:
    norms = np.array([0.1, 1.0, 3.0, 25.0])
    G = np.diag(norms)  # orthogonal gradients g_i = norms[i] * e_i
    alpha = nash_weights(G @ G.T)
    np.testing.assert_allclose(alpha, 1.0 / norms, rtol=1e-8)


def test_nash_warm_start() -> None:
    rng = np.random.default_rng(5)
    G = rng.normal(size=(6, 40)) * rng.uniform(0.1, 10.0, size=(6, 1))
    G_next = G + 0.05 * rng.normal(size=G.shape) * np.abs(G).mean(1, keepdims=True)
    prev = solve_nash(G @ G.T)
    cold = solve_nash(G_next @ G_next.T)
    warm = solve_nash(G_next @ G_next.T, init=prev.alpha)
    assert prev.converged and cold.converged and warm.converged
    assert warm.iterations <= cold.iterations
    np.testing.assert_allclose(warm.alpha, cold.alpha, rtol=1e-6)


def test_nash_ill_posed_returns_none() -> None:
    assert nash_weights(np.zeros((3, 3))) is None
    gram = random_gram(3, 10, 0)
    gram[0, 1] = np.nan
    assert nash_weights(gram) is None
    assert nash_weights(torch.full((2, 2), float("inf"))) is None
    g = np.array([1.0, -2.0, 0.5])
    opposite = np.stack([g, -g])  # g_1 + g_2 = 0: f unbounded, no Nash solution
    assert nash_weights(opposite @ opposite.T) is None
    zero_task = np.stack([g, np.zeros(3)])  # a zero gradient: alpha_2 -> infinity
    assert nash_weights(zero_task @ zero_task.T) is None


def test_nash_ridge_makes_it_solvable() -> None:
    g = np.array([1.0, -2.0, 0.5])
    opposite = np.stack([g, -g])
    alpha = nash_weights(opposite @ opposite.T, eps=1e-3)
    assert alpha is not None and np.all(np.isfinite(alpha)) and np.all(alpha > 0)


def test_nash_parallel_gradients_have_solution() -> None:
    g = np.array([1.0, 2.0, -1.0])
    G = np.stack([g, 2 * g, 3 * g])
    alpha = nash_weights(G @ G.T)
    assert alpha is not None and nash_residual(G @ G.T, alpha) < 1e-6


def test_nash_validation() -> None:
    with pytest.raises(ConfigError):
        nash_weights(np.ones((2, 3)))
    with pytest.raises(ConfigError):
        nash_weights(np.eye(2), init=np.array([1.0, -1.0]))
    with pytest.raises(ConfigError):
        nash_weights(np.eye(2), init=np.ones(3))
    with pytest.raises(ConfigError):
        nash_residual(np.eye(2), np.ones(3))


# ========================================================================= UW
def test_uw_loss_matches_formula() -> None:
    losses = torch.tensor([0.9, 0.4, 0.1])
    s = torch.tensor([0.2, -0.5, 1.0])
    K = 3
    expected = sum(0.5 * (math.exp(-si) * li / K + si) for li, si in zip(losses.tolist(), s.tolist()))
    assert uw_loss(losses, s).item() == pytest.approx(expected, rel=1e-6)
    # s = 0 (initialisation): L = 1/2 * mean(L_i)
    assert uw_loss(losses, torch.zeros(3)).item() == pytest.approx(0.5 * losses.mean().item(), rel=1e-6)


def test_uw_weights() -> None:
    s = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    w = uw_weights(s)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.25]))
    assert not w.requires_grad


def test_uw_gradient_zero_at_optimum() -> None:
    losses = torch.tensor([2.0, 0.5, 0.05, 0.01], dtype=torch.float64)
    s = uw_optimum(losses, 4).clone().requires_grad_(True)
    torch.testing.assert_close(torch.exp(s.detach()), losses / 4)
    uw_loss(losses, s).backward()
    torch.testing.assert_close(s.grad, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_uw_active_mask() -> None:
    losses = torch.tensor([0.8, float("nan"), 0.2, 0.4])  # task 1 absent from the batch
    active = torch.tensor([True, False, True, True])
    s = torch.tensor([0.1, 5.0, -0.3, 0.0], requires_grad=True)
    out = uw_loss(losses, s, active=active)
    K = 3  # number of active intervals
    expected = sum(
        0.5 * (math.exp(-s[i].item()) * losses[i].item() / K + s[i].item()) for i in (0, 2, 3)
    )
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out.backward()
    assert s.grad[1].item() == 0.0 and torch.all(torch.isfinite(s.grad))
    # All-active mask equals no mask.
    s2 = torch.tensor([0.1, 0.2, -0.3, 0.0])
    full = torch.tensor([0.8, 0.5, 0.2, 0.4])
    torch.testing.assert_close(uw_loss(full, s2, active=torch.ones(4, dtype=torch.bool)), uw_loss(full, s2))
    # No active interval: zero loss, no NaN.
    assert uw_loss(full, s2, active=torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_uw_gradient_flows_to_losses() -> None:
    losses = torch.tensor([0.8, 0.2], requires_grad=True)
    s = torch.tensor([0.0, math.log(0.5)])
    uw_loss(losses, s).backward()
    # dL/dL_i = 1/2 * exp(-s_i) / K
    torch.testing.assert_close(losses.grad, torch.tensor([0.25, 0.5]))


def test_uw_validation() -> None:
    with pytest.raises(ConfigError):
        uw_loss(torch.ones(3), torch.zeros(2))
    with pytest.raises(ConfigError):
        uw_loss(torch.ones(3), torch.zeros(3), active=torch.ones(3))  # not bool
    with pytest.raises(ConfigError):
        uw_loss(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ConfigError):
        uw_optimum(torch.tensor([1.0, 0.0]), 2)
    with pytest.raises(ConfigError):
        uw_optimum(torch.tensor([1.0, 2.0]), 0)


def test_pcgrad_matches_loop_reference_random() -> None:
    grads = torch.randn(6, 20, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    perms = [torch.randperm(6, generator=gen).tolist() for _ in range(6)]
    rows = []
    for i in range(6):
        h = grads[i].clone()
        for j in perms[i]:
            d = torch.dot(h, grads[j])
            if d < 0:
                h = h - d / torch.dot(grads[j], grads[j]) * grads[j]
        rows.append(h)
    expected = torch.stack(rows).mean(0)
    torch.testing.assert_close(pcgrad(grads, generator=torch.Generator().manual_seed(4)), expected)


def _gram_with_condition(K: int, cond: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(K, K)))
    eig = np.geomspace(1.0, 1.0 / cond, K) * scale
    return (q * eig) @ q.T


def test_nash_solves_ill_conditioned_and_scaled_grams() -> None:
    """A solved problem returns alpha: ill-conditioned (up to 1e6) and scaled (1e-6..1e6) Gram
    matrices converge to K alpha = 1/alpha, where damped Newton with Armijo alone stalled near the
    tolerance on some CPUs (e.g. a 3x3 Gram of condition 7 scaled by 37)."""
    rng = np.random.default_rng(1234)
    cases = [(3, 7.0, 37.0)] + [(int(rng.integers(2, 11)), float(10 ** rng.uniform(0, 6)),
                                 float(10 ** rng.uniform(-6, 6))) for _ in range(300)]
    for K, cond, scale in cases:
        gram = _gram_with_condition(K, cond, scale, rng)
        alpha = nash_weights(gram)
        assert alpha is not None, (K, cond, scale)
        np.testing.assert_allclose(gram @ alpha, 1.0 / alpha, rtol=1e-6)
