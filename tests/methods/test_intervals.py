"""Tests for trainers.methods.intervals (ANT interval clustering, docs/methods.md, "Intervals")."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from trainers.errors import ConfigError
from trainers.methods.intervals import (
    RULES,
    Intervals,
    affinity_cost,
    partition_cost,
    partition_dp,
    resolve_intervals,
    timestep_cost,
    value_cost,
)


# ------------------------------------------------------------------ helpers
def linear_snr(T: int) -> np.ndarray:
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    ab = np.cumprod(1.0 - betas)
    return ab / (1.0 - ab)


def cosine_snr(T: int) -> np.ndarray:
    def f(u: np.ndarray) -> np.ndarray:
        return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

    t = np.arange(T, dtype=np.float64)
    betas = np.minimum(1.0 - f((t + 1) / T) / f(t / T), 0.999)
    ab = np.cumprod(1.0 - betas)
    return ab / (1.0 - ab)


def centre(l: int, r: int) -> int:
    return (l + r + 1) // 2


def naive_cost(kind: str, data: np.ndarray | None, l: int, r: int) -> float:
    """Interval cost straight from the definition (no prefix sums)."""
    c = centre(l, r)
    ts = range(l, r + 1)
    if kind == "timestep":
        return float(sum(abs(t - c) for t in ts))
    if kind == "value":
        return float(sum(abs(data[t] - data[c]) for t in ts))
    return -float(sum(data[c, t] for t in ts))


def brute_force(C: np.ndarray, T: int, K: int, min_width: int = 1) -> float:
    best = np.inf
    for cuts in itertools.combinations(range(1, T), K - 1):
        bounds = (0,) + cuts + (T,)
        if min(b1 - b0 for b0, b1 in zip(bounds, bounds[1:])) < min_width:
            continue
        best = min(best, sum(C[lo, hi - 1] for lo, hi in zip(bounds, bounds[1:])))
    return best


def make_cost(kind: str, T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    if kind == "timestep":
        return timestep_cost(T), None
    if kind == "value":
        v = np.cumsum(rng.exponential(size=T)) * rng.choice([-1.0, 1.0])  # monotone, either way
        return value_cost(v), v
    a = rng.uniform(-1, 1, size=(T, T))
    tas = (a + a.T) / 2
    np.fill_diagonal(tas, 1.0)
    return affinity_cost(tas), tas


# -------------------------------------------------------------- cost builders
@pytest.mark.parametrize("kind", ["timestep", "value", "affinity"])
def test_cost_matrix_matches_definition(kind: str) -> None:
    rng = np.random.default_rng(0)
    T = 9
    C, data = make_cost(kind, T, rng)
    assert C.shape == (T, T) and C.dtype == np.float64
    for l in range(T):
        for r in range(l, T):
            assert C[l, r] == pytest.approx(naive_cost(kind, data, l, r), abs=1e-9)


def test_value_cost_exact_for_non_monotone_sequence() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=11)
    C = value_cost(v)
    for l in range(11):
        for r in range(l, 11):
            assert C[l, r] == pytest.approx(naive_cost("value", v, l, r), abs=1e-9)


def test_single_point_costs() -> None:
    tas = np.eye(4)
    assert np.all(np.diag(affinity_cost(tas)) == -1.0)
    assert np.all(np.diag(value_cost(np.arange(4.0) ** 2)) == 0.0)


# ------------------------------------------------------------ DP vs brute force
@pytest.mark.parametrize("kind", ["timestep", "value", "affinity"])
@pytest.mark.parametrize("min_width", [1, 2, 3])
def test_partition_dp_equals_brute_force(kind: str, min_width: int) -> None:
    rng = np.random.default_rng(123 + min_width)
    for T in (1, 2, 5, 8, 12):
        C, _ = make_cost(kind, T, rng)
        for K in range(1, 5):
            if K > T or K * min_width > T:
                with pytest.raises(ConfigError):
                    partition_dp(C, T, K, min_width=min_width)
                continue
            iv, total = partition_dp(C, T, K, min_width=min_width)
            assert iv.num_intervals == K and iv.num_timesteps == T
            assert min(iv.widths()) >= min_width
            assert total == pytest.approx(partition_cost(C, iv), abs=1e-9)
            assert total == pytest.approx(brute_force(C, T, K, min_width), abs=1e-9)


def test_partition_dp_accepts_callable_cost() -> None:
    T, K = 10, 3
    iv_c, cost_c = partition_dp(lambda l, r: naive_cost("timestep", None, l, r), T, K)
    iv_m, cost_m = partition_dp(timestep_cost(T), T, K)
    assert iv_c == iv_m and cost_c == cost_m


def test_partition_dp_ignores_lower_triangle() -> None:
    T = 7
    C = timestep_cost(T)
    C_junk = C + np.tril(np.full((T, T), 1e9), k=-1)
    assert partition_dp(C_junk, T, 3) == partition_dp(C, T, 3)


def test_partition_dp_timing_T1000_K20() -> None:
    T, K = 1000, 20
    t0 = time.perf_counter()
    C = value_cost(np.log(linear_snr(T)))
    t1 = time.perf_counter()
    iv, _ = partition_dp(C, T, K)
    t2 = time.perf_counter()
    print(f"\nvalue_cost build T={T}: {1e3 * (t1 - t0):.1f} ms; partition_dp K={K}: {1e3 * (t2 - t1):.1f} ms")
    assert iv.num_intervals == K


# ---------------------------------------------- reference partitions (docs/methods.md)
def test_timestep_k5_close_to_reference() -> None:
    iv, cost = resolve_intervals("timestep", 1000, 5)
    reference = [(0, 198), (199, 397), (398, 597), (598, 798), (799, 999)]
    for (lo, hi), (rlo, rhi) in zip(iv.inclusive_pairs(), reference):
        assert abs(lo - rlo) <= 2 and abs(hi - rhi) <= 2
    uniform, uniform_cost = resolve_intervals("uniform", 1000, 5)
    assert cost <= uniform_cost  # DP is optimal; here the two tie at 50000
    assert cost == pytest.approx(50000.0)


REFERENCE = [
    ("linear", "snr", 5, [(0, 0), (1, 1), (2, 4), (5, 17), (18, 999)]),
    ("cosine", "snr", 5, [(0, 0), (1, 3), (4, 10), (11, 35), (36, 999)]),
    ("linear", "snr", 8, [(0, 0), (1, 1), (2, 2), (3, 5), (6, 10), (11, 23), (24, 62), (63, 999)]),
    ("linear", "log-snr", 5, [(0, 152), (153, 393), (394, 623), (624, 822), (823, 999)]),
    ("cosine", "log-snr", 5, [(0, 132), (133, 371), (372, 652), (653, 880), (881, 999)]),
]


@pytest.mark.parametrize("schedule,rule,K,expected", REFERENCE)
def test_reference_cluster_outputs(schedule: str, rule: str, K: int, expected: list) -> None:
    snr = linear_snr(1000) if schedule == "linear" else cosine_snr(1000)
    iv, _ = resolve_intervals(rule, 1000, K, snr=snr)
    assert iv.inclusive_pairs() == expected


# ---------------------------------------------------------------- Intervals
def test_uniform_widths() -> None:
    assert Intervals.uniform(1000, 5).widths() == (200,) * 5
    assert Intervals.uniform(10, 3).bounds == (0, 3, 6, 10)
    iv, cost = resolve_intervals("uniform", 10, 3)
    assert iv.bounds == (0, 3, 6, 10)
    assert cost == partition_cost(timestep_cost(10), iv)
    assert Intervals.uniform(7, 7).widths() == (1,) * 7


def test_task_id_round_trip() -> None:
    iv = Intervals((0, 3, 4, 9, 10))
    t = torch.arange(10)
    ids = iv.task_id(t)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3]
    for k, (lo, hi) in enumerate(iv.pairs()):
        assert torch.all(ids[lo:hi] == k)
    t2 = torch.tensor([[9, 0], [3, 4]], dtype=torch.int32)
    assert iv.task_id(t2).tolist() == [[3, 0], [1, 2]]


def test_serialisation_round_trips() -> None:
    iv = Intervals((0, 2, 5, 10))
    assert Intervals.from_list(iv.to_list()) == iv
    assert Intervals.from_pairs(iv.pairs()) == iv
    assert iv.pairs() == [(0, 2), (2, 5), (5, 10)]
    assert iv.inclusive_pairs() == [(0, 1), (2, 4), (5, 9)]
    assert iv.num_intervals == 3 and iv.num_timesteps == 10 and iv.widths() == (2, 3, 5)
    assert Intervals([0, np.int64(4)]).bounds == (0, 4)


def test_explicit_rule() -> None:
    iv, cost = resolve_intervals("explicit", 10, 2, pairs=[[0, 4], [4, 10]])
    assert iv.bounds == (0, 4, 10)
    assert cost == partition_cost(timestep_cost(10), iv)
    with pytest.raises(ConfigError):
        resolve_intervals("explicit", 10, 3, pairs=[[0, 4], [4, 10]])
    with pytest.raises(ConfigError):
        resolve_intervals("explicit", 10, 2, pairs=[[0, 3], [4, 9]])  # inclusive pairs rejected
    with pytest.raises(ConfigError):
        resolve_intervals("explicit", 10, 2)


def test_affinity_rule_blocks() -> None:
    T = 12
    tas = np.full((T, T), -1.0)
    for lo, hi in [(0, 5), (5, 12)]:
        tas[lo:hi, lo:hi] = 1.0
    iv, cost = resolve_intervals("affinity", T, 2, tas=tas)
    assert iv.bounds == (0, 5, 12)
    assert cost == -(5 + 7)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "bounds",
    [(0,), (1, 5), (0, 3, 3, 6), (0, 4, 2, 6), (0, 2.5, 6), (), (0, True)],
)
def test_invalid_bounds_raise(bounds: tuple) -> None:
    with pytest.raises(ConfigError):
        Intervals(bounds)


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        partition_dp(timestep_cost(4), 4, 5)  # K > T
    with pytest.raises(ConfigError):
        partition_dp(timestep_cost(10), 10, 4, min_width=3)  # K*min_width > T
    with pytest.raises(ConfigError):
        partition_dp(timestep_cost(5), 6, 2)  # wrong shape
    with pytest.raises(ConfigError, match="log-snr"):
        resolve_intervals("kmeans", 10, 2)  # message lists the valid rules
    with pytest.raises(ConfigError):
        resolve_intervals("snr", 10, 2)  # missing snr
    with pytest.raises(ConfigError):
        resolve_intervals("log-snr", 3, 2, snr=np.array([1.0, 0.0, -1.0]))
    with pytest.raises(ConfigError):
        resolve_intervals("uniform", 10, 11)
    with pytest.raises(ConfigError):
        Intervals.uniform(3, 0)
    with pytest.raises(ConfigError):
        affinity_cost(np.ones((3, 4)))
    bad = timestep_cost(4)
    bad[0, 3] = np.nan
    with pytest.raises(ConfigError):
        partition_dp(bad, 4, 2)
    assert set(RULES) == {"uniform", "timestep", "snr", "log-snr", "affinity", "explicit"}
    assert issubclass(ConfigError, ValueError)
