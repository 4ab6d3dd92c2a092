"""Curriculum clusters (Intervals from the shared resolver) and the pacing state machines."""
from __future__ import annotations

import io
import math
import random

import pytest
import torch

from trainers.errors import CheckpointError, ConfigError, TrainingDiverged
from trainers.methods.curriculum import CurriculumConfig, curriculum_intervals
from trainers.methods.pacing import (
    AdaptivePacer,
    FixedPacer,
    active_clusters,
    cluster_order,
)


def curriculum_clusters(T: int, N: int) -> list[tuple[int, int]]:
    """The curriculum's clusters as [lo, hi) pairs, built the way the method builds them."""
    if N < 1:
        raise ConfigError("N must be >= 1")
    return curriculum_intervals(CurriculumConfig(clusters=N), T).pairs()


def _advance_steps(pacer, losses) -> list[int]:
    """1-based update indices at which ``pacer`` advanced."""
    return [i for i, loss in enumerate(losses, start=1) if pacer.update(loss)]


def _noisy_losses(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [1.0 / (1 + 0.01 * i) + rng.uniform(0.0, 0.05) for i in range(n)]


# ------------------------------------------------------------------ clusters and orders


def test_uniform_clusters() -> None:
    clusters = curriculum_clusters(1000, 20)
    assert clusters[0] == (0, 50) and clusters[-1] == (950, 1000)
    assert all(hi - lo == 50 for lo, hi in clusters)
    assert curriculum_clusters(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert curriculum_clusters(5, 5) == [(i, i + 1) for i in range(5)]
    assert curriculum_clusters(7, 1) == [(0, 7)]


def test_clusters_tile_the_range() -> None:
    for T, N in ((1000, 7), (999, 20), (13, 13)):
        clusters = curriculum_clusters(T, N)
        assert len(clusters) == N
        assert clusters[0][0] == 0 and clusters[-1][1] == T
        assert all(a[1] == b[0] for a, b in zip(clusters, clusters[1:]))
        assert all(hi > lo for lo, hi in clusters)


def test_cluster_errors() -> None:
    with pytest.raises(ConfigError, match="clusters: 11 exceeds diffusion.steps=10"):
        curriculum_clusters(10, 11)
    with pytest.raises(ConfigError, match="clusters: must be >= 1"):
        CurriculumConfig(clusters=0)
    with pytest.raises(ConfigError, match="exceeds diffusion.steps=0"):
        curriculum_clusters(0, 1)


def test_orders() -> None:
    assert cluster_order(5, "easy_to_hard") == [4, 3, 2, 1, 0]
    assert cluster_order(5, "hard_to_easy") == [0, 1, 2, 3, 4]
    a = cluster_order(20, "random", seed=7)
    assert a == cluster_order(20, "random", seed=7)
    assert sorted(a) == list(range(20))
    assert a != cluster_order(20, "random", seed=8)
    assert all(isinstance(i, int) for i in a)
    with pytest.raises(ConfigError, match="ordering"):
        cluster_order(5, "easiest_first")


def test_active_clusters_accumulate() -> None:
    order = cluster_order(4, "easy_to_hard")
    assert active_clusters(order, 1) == [3]
    assert active_clusters(order, 2) == [3, 2]
    assert active_clusters(order, 4) == [3, 2, 1, 0]
    with pytest.raises(ConfigError, match="stage"):
        active_clusters(order, 0)
    with pytest.raises(ConfigError, match="stage"):
        active_clusters(order, 5)


# ------------------------------------------------------------------ adaptive, patience mode


def test_strictly_decreasing_loss_never_advances() -> None:
    pacer = AdaptivePacer(num_stages=4, patience=3)
    assert _advance_steps(pacer, [1.0 / (i + 1) for i in range(500)]) == []
    assert pacer.stage == 1 and pacer.num_active() == 1 and not pacer.finished


def test_flat_loss_advances_every_patience_plus_one() -> None:
    pacer = AdaptivePacer(num_stages=4, patience=3)
    # First update of a stage sets best; tau more without improvement advance.
    assert _advance_steps(pacer, [1.0] * 40) == [4, 8, 12]
    assert pacer.stage == 4 and pacer.finished and pacer.num_active() == 4


def test_delta_threshold() -> None:
    losses = [1.0 - 3e-5 * i for i in range(40)]  # improves by > 1e-4 only every 4th step
    assert _advance_steps(AdaptivePacer(4, patience=4, delta=1e-4), losses) == []
    assert _advance_steps(AdaptivePacer(4, patience=3, delta=1e-4), losses) == [4, 8, 12]
    assert _advance_steps(AdaptivePacer(4, patience=3, delta=0.0), losses) == []


def test_best_and_count_reset_at_stage_change() -> None:
    pacer = AdaptivePacer(num_stages=3, patience=2)
    assert _advance_steps(pacer, [1.0, 1.0, 1.0]) == [3]
    m = pacer.metrics()
    assert m["stage"] == 2.0 and m["best"] == math.inf and m["count"] == 0.0
    assert m["stage_steps"] == 0.0
    assert not pacer.update(2.0)  # higher than the old best, still becomes the new best
    assert pacer.metrics()["best"] == 2.0 and pacer.metrics()["count"] == 0.0


def test_ema_smoothing_values_and_delay() -> None:
    pacer = AdaptivePacer(num_stages=3, patience=2, ema=0.5)
    for loss, expected in zip([4.0, 2.0, 2.0, 2.0], [4.0, 3.0, 2.5, 2.25]):
        assert not pacer.update(loss)
        assert pacer.metrics()["smoothed_loss"] == expected
    # A drop then a plateau: raw loss advances at update 4, the smoothed one keeps improving.
    step_drop = [8.0] + [0.0] * 99
    assert _advance_steps(AdaptivePacer(3, patience=2), step_drop)[:1] == [4]
    assert _advance_steps(AdaptivePacer(3, patience=2, ema=0.5), step_drop) == []


def test_ema_restarts_at_stage_change() -> None:
    pacer = AdaptivePacer(num_stages=3, patience=1, ema=0.9)
    assert _advance_steps(pacer, [1.0, 1.0]) == [2]
    pacer.update(5.0)
    assert pacer.metrics()["smoothed_loss"] == 5.0  # seeded by the first loss of the stage


def test_finished_pacer_stays_finished() -> None:
    pacer = AdaptivePacer(num_stages=1, patience=1)
    assert pacer.finished
    assert _advance_steps(pacer, [1.0] * 20) == []
    assert pacer.stage == 1


def test_non_finite_loss_raises() -> None:
    pacer = AdaptivePacer(num_stages=3, patience=2)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        pacer.update(float("nan"))


# ------------------------------------------------------------------ adaptive, cap mode


def test_cap_mode_advances_at_tau_while_improving() -> None:
    pacer = AdaptivePacer(num_stages=4, patience=10, mode="cap")
    assert _advance_steps(pacer, [1.0 / (i + 1) for i in range(100)]) == [10, 20, 30]


def test_cap_mode_advances_early_on_convergence() -> None:
    # Default converge window = min(tau, 50) = 50: flat loss converges after 1 + 50 updates.
    assert _advance_steps(AdaptivePacer(3, patience=100, mode="cap"), [1.0] * 200) == [51, 102]
    # tau below the default window: the cap fires first.
    assert _advance_steps(AdaptivePacer(3, patience=20, mode="cap"), [1.0] * 100) == [20, 40]
    explicit = AdaptivePacer(3, patience=10, mode="cap", converge_window=3)
    assert _advance_steps(explicit, [1.0] * 30) == [4, 8]


def test_patience_mode_ignores_converge_window() -> None:
    pacer = AdaptivePacer(3, patience=3, converge_window=1)
    assert _advance_steps(pacer, [1.0] * 20) == [4, 8]


# ------------------------------------------------------------------ fixed pacing


def test_fixed_constant_stage_lengths() -> None:
    pacer = FixedPacer(num_stages=4, stage_steps=5)
    assert _advance_steps(pacer, [0.0] * 100) == [5, 10, 15]
    assert pacer.finished and pacer.num_active() == 4


def test_fixed_linear_stage_lengths() -> None:
    pacer = FixedPacer(num_stages=4, stage_steps=2, schedule="linear")
    assert _advance_steps(pacer, [0.0] * 100) == [2, 6, 12]  # stages last 2, 4, 6 updates


def test_fixed_pacer_accepts_no_loss() -> None:
    pacer = FixedPacer(num_stages=2, stage_steps=1)
    assert pacer.update() is True
    assert pacer.metrics() == {"stage": 2.0, "stage_steps": 0.0}


# ------------------------------------------------------------------ state dict round trips


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: AdaptivePacer(6, patience=5, delta=1e-3, ema=0.9),
        lambda: AdaptivePacer(6, patience=5, ema=0.5, mode="cap", converge_window=3),
        lambda: AdaptivePacer(6, patience=4),
        lambda: FixedPacer(6, stage_steps=7, schedule="linear"),
    ],
)
@pytest.mark.parametrize("split", [1, 13, 37])
def test_state_dict_resume_matches_uninterrupted(make, split: int) -> None:
    losses = _noisy_losses(300, seed=split)
    reference = make()
    expected = _advance_steps(reference, losses)
    assert expected  # the scenario exercises at least one advance

    first = make()
    got = _advance_steps(first, losses[:split])
    state = _round_trip(first.state_dict())
    assert all(type(v) in (int, float) for v in state.values())
    resumed = make()
    resumed.load_state_dict(state)
    got += [split + i for i in _advance_steps(resumed, losses[split:])]
    assert got == expected
    assert resumed.state_dict() == reference.state_dict()
    assert resumed.metrics() == pytest.approx(reference.metrics(), nan_ok=True)


def test_state_dict_holds_inf_best_at_start() -> None:
    state = _round_trip(AdaptivePacer(3, patience=2).state_dict())
    assert state["best"] == math.inf and state["stage"] == 1 and state["num_stages"] == 3


def test_load_state_dict_rejects_mismatch() -> None:
    state = AdaptivePacer(3, patience=2).state_dict()
    with pytest.raises(CheckpointError, match="num_stages"):
        AdaptivePacer(4, patience=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="keys"):
        FixedPacer(3, stage_steps=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="stage"):
        AdaptivePacer(3, patience=2).load_state_dict({**state, "stage": 9})


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_stages": 0, "patience": 2}, "num_stages"),
        ({"num_stages": 3, "patience": 0}, "patience"),
        ({"num_stages": 3, "patience": 2, "delta": -1.0}, "delta"),
        ({"num_stages": 3, "patience": 2, "ema": 1.0}, "ema"),
        ({"num_stages": 3, "patience": 2, "ema": -0.1}, "ema"),
        ({"num_stages": 3, "patience": 2, "mode": "fixed"}, "mode"),
        ({"num_stages": 3, "patience": 2, "converge_window": 0}, "converge_window"),
        ({"num_stages": 3.0, "patience": 2}, "num_stages"),
    ],
)
def test_adaptive_config_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        AdaptivePacer(**kwargs)


def test_fixed_config_errors() -> None:
    with pytest.raises(ConfigError, match="stage_steps"):
        FixedPacer(3, stage_steps=0)
    with pytest.raises(ConfigError, match="schedule"):
        FixedPacer(3, stage_steps=2, schedule="cosine")


def test_config_is_frozen() -> None:
    pacer = AdaptivePacer(3, patience=2)
    with pytest.raises(Exception):
        pacer.config.patience = 5  # type: ignore[misc]
