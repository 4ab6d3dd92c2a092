"""DTR routing masks (docs/methods.md, "DTR")."""
from __future__ import annotations

import math

import pytest
import torch

from trainers.errors import ConfigError
from trainers.methods.routing import (
    active_channel_count,
    random_routing_masks,
    routing_masks,
    routing_task_index,
    shared_channels,
    window_starts,
)


def _starts_from_masks(masks: torch.Tensor) -> torch.Tensor:
    return masks.argmax(dim=1)  # first active channel per row


@pytest.mark.parametrize("channels", [8, 100, 384, 768, 1024, 1152])
@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
def test_row_sums_equal_floor_ratio_times_channels(channels: int, ratio: float) -> None:
    masks = routing_masks(50, channels, ratio, 4.0)
    assert masks.shape == (50, channels)
    assert masks.dtype == torch.float32
    assert torch.all(masks.sum(dim=1) == math.floor(ratio * channels))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(("channels", "expected"), [(384, 307), (768, 614), (1024, 819), (1152, 921)])
def test_worked_dit_sizes(channels: int, expected: int) -> None:
    assert active_channel_count(channels, 0.8) == expected


def test_floor_tolerates_binary_rounding() -> None:
    assert 0.29 * 100 < 29  # 28.999999999999996 in binary floating point
    assert active_channel_count(100, 0.29) == 29


@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0, 8.0])
def test_windows_are_contiguous_and_start_at_s(alpha: float) -> None:
    masks = routing_masks(1000, 384, 0.8, alpha)
    starts = window_starts(1000, 384, 0.8, alpha)
    width = 307
    c = torch.arange(384)
    expected = ((c >= starts[:, None]) & (c < starts[:, None] + width)).float()
    assert torch.equal(masks, expected)
    assert torch.equal(_starts_from_masks(masks), starts)


@pytest.mark.parametrize(("channels", "ratio"), [(384, 0.8), (1152, 0.8), (100, 0.5), (768, 0.9)])
def test_window_starts_endpoints(channels: int, ratio: float) -> None:
    starts = window_starts(1000, channels, ratio, 4.0)
    width = math.floor(ratio * channels)
    assert starts[0].item() == 0
    assert starts[-1].item() == channels - width
    assert torch.all(starts[1:] >= starts[:-1])  # monotone slide


def test_alpha4_start_positions_match_spec_percentages() -> None:
    channels, num_tasks = 384, 1000
    starts = window_starts(num_tasks, channels, 0.8, 4.0)
    # Exact: round((t/999)^4 * 77) with half-to-even.
    assert starts[500].item() == 5
    assert starts[750].item() == 24
    assert starts[900].item() == 51
    # Spec: ≈ 1.25% of C at T/2, 6.3% at 0.75T, 13% at 0.9T.
    for t, pct in ((500, 0.0125), (750, 0.063), (900, 0.13)):
        assert abs(starts[t].item() - pct * channels) <= 0.02 * channels


def test_globally_shared_channels_active_for_all_tasks() -> None:
    channels, ratio = 384, 0.8
    width = math.floor(ratio * channels)
    masks = routing_masks(1000, channels, ratio, 4.0)
    assert torch.all(masks[:, channels - width : width] == 1)
    # The last (C − C_β) channels appear only for high t: never at t = 0.
    assert torch.all(masks[0, width:] == 0)
    assert torch.all(masks[-1, width:] == 1)


def test_shared_count_is_width_minus_start_distance() -> None:
    num_tasks, channels, ratio = 200, 96, 0.6
    width = math.floor(ratio * channels)
    masks = routing_masks(num_tasks, channels, ratio, 2.0)
    starts = window_starts(num_tasks, channels, ratio, 2.0)
    overlap = masks @ masks.T  # [T, T]
    dist = (starts[:, None] - starts[None, :]).abs()
    expected = (width - dist).clamp_min(0).float()
    assert torch.equal(overlap, expected)
    for t1, t2 in ((0, 199), (0, 100), (57, 58), (150, 150)):
        assert shared_channels(masks, t1, t2) == max(0, width - abs(int(starts[t1] - starts[t2])))


def test_small_ratio_gives_disjoint_extremes() -> None:
    masks = routing_masks(10, 10, 0.3, 1.0)  # width 3, slack 7: s(0)=0, s(9)=7
    assert shared_channels(masks, 0, 9) == 0


def test_ratio_one_is_exactly_all_ones() -> None:
    for alpha in (0.5, 4.0):
        masks = routing_masks(1000, 1152, 1.0, alpha)
        assert torch.equal(masks, torch.ones(1000, 1152))
    assert torch.equal(random_routing_masks(20, 64, 1.0, seed=3), torch.ones(20, 64))


def test_single_task() -> None:
    masks = routing_masks(1, 10, 0.8, 4.0)
    assert torch.equal(masks, torch.tensor([[1.0] * 8 + [0.0] * 2]))


def test_random_routing_deterministic_and_seed_dependent() -> None:
    a = random_routing_masks(100, 384, 0.8, seed=0)
    b = random_routing_masks(100, 384, 0.8, seed=0)
    c = random_routing_masks(100, 384, 0.8, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == (100, 384)
    assert torch.all(a.sum(dim=1) == 307)
    assert torch.all(c.sum(dim=1) == 307)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert len({tuple(row.tolist()) for row in a}) > 1  # tasks get different subsets


def test_task_index_identity_and_coarse() -> None:
    t = torch.arange(1000)
    assert torch.equal(routing_task_index(t, 1000, 1000), t)
    coarse = routing_task_index(t, 1000, 100)
    assert torch.equal(coarse, t // 10)
    assert coarse.dtype == torch.int64
    odd = routing_task_index(torch.tensor([0, 332, 333, 334, 666, 667, 999]), 1000, 3)
    assert odd.tolist() == [0, 0, 0, 1, 1, 2, 2]  # floor(t*3/1000)
    assert routing_task_index(torch.tensor([5, 999]), 1000, 1).tolist() == [0, 0]
    assert routing_task_index(torch.tensor([7], dtype=torch.int32), 1000, 1000).dtype == torch.int64


def test_task_index_rejects_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="num_tasks"):
        routing_task_index(torch.arange(4), 10, 20)
    with pytest.raises(ConfigError, match="t must be an integer tensor"):
        routing_task_index(torch.rand(4), 10, 10)
    with pytest.raises(ConfigError, match="num_timesteps"):
        routing_task_index(torch.arange(4), 0, 1)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, 2.0, float("nan")])
def test_bad_ratio_raises(ratio: float) -> None:
    with pytest.raises(ConfigError, match="active_ratio"):
        routing_masks(10, 64, ratio, 4.0)
    with pytest.raises(ConfigError, match="active_ratio"):
        random_routing_masks(10, 64, ratio, seed=0)


def test_ratio_too_small_for_width_raises() -> None:
    with pytest.raises(ConfigError, match="active_ratio"):
        routing_masks(10, 4, 0.2, 4.0)


@pytest.mark.parametrize("channels", [0, -3, 2.5])
def test_bad_channels_raises(channels) -> None:
    with pytest.raises(ConfigError, match="channels"):
        routing_masks(10, channels, 0.8, 4.0)


def test_bad_num_tasks_and_alpha_raise() -> None:
    with pytest.raises(ConfigError, match="num_tasks"):
        routing_masks(0, 64, 0.8, 4.0)
    with pytest.raises(ConfigError, match="alpha"):
        routing_masks(10, 64, 0.8, 0.0)
    with pytest.raises(ConfigError, match="alpha"):
        routing_masks(10, 64, 0.8, float("inf"))
    with pytest.raises(ConfigError, match="seed"):
        random_routing_masks(10, 64, 0.8, seed=1.5)


def test_shared_channels_validates() -> None:
    masks = routing_masks(10, 16, 0.5, 1.0)
    with pytest.raises(ConfigError, match="t2"):
        shared_channels(masks, 0, 10)
    with pytest.raises(ConfigError, match="masks"):
        shared_channels(masks[0], 0, 1)


def test_config_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        routing_masks(10, 64, 1.5, 4.0)
