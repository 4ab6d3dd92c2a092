"""Nash-MTL bargaining weights over timestep-interval tasks.

ANT (Go et al., NeurIPS 2023, arXiv 2306.00354), method section, applying Navon et al.'s
Nash-MTL to the interval tasks (docs/methods.md, "ANT"). With ``G = [g_1; ...; g_K]`` and Gram
``K = G G^T`` the weights ``alpha > 0`` solve the Nash bargaining condition

    (K alpha)_i = 1 / alpha_i        for all i,

and the update direction is ``sum_i alpha_i g_i``.

Solver: our own exact method, *not* the reference's sequential convex approximation with cvxpy.
The condition is exactly the stationarity condition of the strictly convex function

    f(alpha) = 1/2 alpha^T K alpha - sum_i log alpha_i,     alpha > 0,

so the Nash weights are its unique minimiser when one exists. We normalise (``c = ||K||_F``,
``K^ = K / c``), minimise ``f`` for ``K^`` by Newton's method (damped with a fraction-to-boundary
step and Armijo backtracking far from the solution, pure near it, where f is self-concordant and
converges quadratically; iterates stay positive), and return ``alpha = beta / sqrt(c)``, which
satisfies ``K alpha = 1 / alpha``. A minimiser fails to exist when some non-negative combination
of the gradients vanishes (e.g. a zero gradient, or ``g_1 = -g_2``); then ``f`` is unbounded
below, the iterates diverge, and :func:`nash_weights` returns ``None`` so the caller can keep the
previous alpha (as the reference does on solver failure). An optional ridge ``eps`` replaces
``K^`` by ``K^ + eps I``, which always has a solution, at the price of a slightly biased alpha.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trainers.errors import ConfigError

__all__ = ["NashSolution", "solve_nash", "nash_weights", "nash_residual"]

# An iterate this large in the normalised problem (||K^||_F = 1) means f is unbounded below, or so
# nearly so that the gradients cancel to round-off: at the solution ||sum_i beta_i g^_i||^2 = K
# while the beta_i themselves explode. It also keeps beta^2 * ||K^|| well inside float64 range.
_DIVERGED = 1e6


@dataclass(frozen=True)
class NashSolution:
    """Result of :func:`solve_nash`; ``alpha`` is ``None`` when the problem is ill-posed."""

    alpha: np.ndarray | None  # [K]
    iterations: int
    residual: float  # max_i |alpha_i (K alpha)_i - 1| (with the ridge, if any)
    converged: bool


def _as_gram(gram: object) -> np.ndarray:
    if isinstance(gram, torch.Tensor):
        gram = gram.detach().cpu().double().numpy()
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 1:
        raise ConfigError(f"gram must be a square K x K matrix, got shape {g.shape}")
    return g


def _residual(Kmat: np.ndarray, beta: np.ndarray) -> float:
    return float(np.max(np.abs(beta * (Kmat @ beta) - 1.0)))


def _start(Kmat: np.ndarray, init: np.ndarray | None, scale: float) -> np.ndarray:
    """Positive starting point in the normalised problem, rescaled to the best multiple of itself."""
    n = Kmat.shape[0]
    if init is None:
        beta = np.ones(n)
    else:
        a = np.asarray(init.detach().cpu() if isinstance(init, torch.Tensor) else init, dtype=np.float64)
        if a.shape != (n,):
            raise ConfigError(f"init must have shape ({n},) to match gram, got {a.shape}")
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ConfigError("init must be finite and strictly positive (a previous alpha)")
        beta = a * scale
    q = float(beta @ Kmat @ beta)
    if q > 0 and math.isfinite(q):  # argmin_s f(s * beta) = sqrt(n / q)
        beta = beta * math.sqrt(n / q)
    return beta


# Newton decrement below which the pure (undamped) Newton step is taken. f is self-concordant (a
# convex quadratic plus a log barrier), so for lambda = sqrt(decrement) < 1 the full step stays
# inside the domain and for lambda < 1/4 it converges quadratically (Boyd & Vandenberghe, §9.6).
# Armijo backtracking cannot work there: f changes by ~1e-16 relative, below float64 resolution,
# which is what made the solver give up on well-posed problems on some CPUs.
_PURE_NEWTON = 0.0625


def _newton_step(Kmat: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, float]:
    """One Newton update for f (damped far from the solution, pure near it); returns the new
    iterate and the Newton decrement squared."""
    grad = Kmat @ beta - 1.0 / beta  # [K]
    # Hessian K + diag(1/beta^2), solved in the scaled form (B K B + I) y = -B grad, d = B y,
    # with B = diag(beta): the scaled matrix has eigenvalues >= 1, so it never goes singular.
    scaled = beta[:, None] * Kmat * beta[None, :] + np.eye(beta.size)  # [K, K]
    d = beta * np.linalg.solve(scaled, -beta * grad)  # [K]
    decrement = float(-grad @ d)
    full = beta + d
    if decrement < _PURE_NEWTON and np.all(full > 0):
        return full, decrement
    neg = d < 0
    step = 1.0 if not neg.any() else min(1.0, 0.99 * float(np.min(-beta[neg] / d[neg])))

    def f(b: np.ndarray) -> float:
        return 0.5 * float(b @ Kmat @ b) - float(np.sum(np.log(b)))

    f0 = f(beta)
    for _ in range(60):  # Armijo backtracking
        cand = beta + step * d
        if f(cand) <= f0 - 0.25 * step * decrement:
            return cand, decrement
        step *= 0.5
    return beta + step * d, decrement


def solve_nash(
    gram: torch.Tensor | np.ndarray,
    init: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-8,
    eps: float = 0.0,
) -> NashSolution:
    """Solve ``K alpha = 1/alpha`` for a Gram matrix ``[K, K]``; see the module docstring.

    ``init`` is a previous alpha (warm start; default: ones in the normalised problem).
    Converged when ``max_i |alpha_i (K alpha)_i - 1| < tol``.
    """
    G = _as_gram(gram)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive int, got {max_iter!r}")
    if not (tol > 0) or not (eps >= 0) or not math.isfinite(eps):
        raise ConfigError(f"tol must be > 0 and eps finite >= 0, got tol={tol!r}, eps={eps!r}")
    if not np.all(np.isfinite(G)):
        return NashSolution(None, 0, math.inf, False)
    G = 0.5 * (G + G.T)
    c = float(np.linalg.norm(G))  # Frobenius
    if not (c > 0) or not math.isfinite(c):
        return NashSolution(None, 0, math.inf, False)
    Kmat = G / c + eps * np.eye(G.shape[0])  # [K, K]
    beta = _start(Kmat, init, math.sqrt(c))
    res = _residual(Kmat, beta)
    it = 0
    while res >= tol and it < max_iter:
        try:
            beta, decrement = _newton_step(Kmat, beta)
        except np.linalg.LinAlgError:
            return NashSolution(None, it, math.inf, False)
        it += 1
        if not np.all(np.isfinite(beta)) or float(beta.max()) > _DIVERGED:
            return NashSolution(None, it, math.inf, False)
        res = _residual(Kmat, beta)
        if decrement < 1e-28:  # no further progress possible in float64
            break
    if res >= tol:
        return NashSolution(None, it, res, False)
    return NashSolution(beta / math.sqrt(c), it, res, True)


def nash_weights(
    gram: torch.Tensor | np.ndarray,
    init: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-8,
    eps: float = 0.0,
) -> np.ndarray | None:
    """Nash-MTL weights ``alpha [K]`` (float64), or ``None`` if ill-posed / not converged."""
    return solve_nash(gram, init=init, max_iter=max_iter, tol=tol, eps=eps).alpha


def nash_residual(gram: torch.Tensor | np.ndarray, alpha: np.ndarray) -> float:
    """``max_i |alpha_i (K alpha)_i - 1|``: 0 exactly at the Nash bargaining solution."""
    G = _as_gram(gram)
    a = np.asarray(alpha.detach().cpu() if isinstance(alpha, torch.Tensor) else alpha, dtype=np.float64)
    if a.shape != (G.shape[0],):
        raise ConfigError(f"alpha must have shape ({G.shape[0]},) to match gram, got {a.shape}")
    return _residual(G, a)
