"""MEME (docs/methods.md, "MEME"): the U-Net experts and their inception mixers, the soft interval
sampler's frequencies, the expert-set expansion (ramp, identical control), and the router."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import randomize_, tiny_config
from trainers.build import build_all
from trainers.config import load_config
from trainers.diffusion import GaussianDiffusion, sample
from trainers.errors import ConfigError
from trainers.methods import Intervals, resolve_intervals
from trainers.methods.meme import (ExpertRouter, MemeConfig, RampConfig, SoftIntervalSampler, expert_configs,
                                   expert_probability, ramp_high)
from trainers.models.unet import InceptionMixer, mixer_split


def _unet(**arch):
    model, *_ = build_all(tiny_config({}, model={"name": "UNet-N", "arch": arch}), image_size=8, channels=1,
                          num_classes=10)
    return model


@pytest.mark.parametrize("high", [0.0, 0.3, 0.5, 1.0])
def test_inception_mixer_shapes_and_both_extremes_train(high: float) -> None:
    mixer = InceptionMixer(32, high, heads=4, pool=2)
    h1, h2, low = mixer.h1, mixer.h2, mixer.low
    assert h1 + h2 + low == 32 and low % 4 == 0
    if high == 1.0:
        assert low == 0 and mixer.low_qkv is None                     # all convolution
    if high == 0.0:
        assert (h1, h2) == (0, 0) and mixer.high_dw is None             # all attention
    randomize_(mixer, seed=1, std=0.1)
    x = torch.randn(3, 32, 8, 8, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in mixer.parameters())         # every branch is used


def test_mixer_split_keeps_attention_heads_whole() -> None:
    assert mixer_split(64, 0.5, 4) == (16, 16, 32)
    assert mixer_split(64, 0.9, 4) == (30, 30, 4)
    assert mixer_split(64, 0.99, 4) == (32, 32, 0)                     # fewer than a head: all conv
    with pytest.raises(ConfigError, match="model.arch.high"):
        mixer_split(64, 1.5, 4)


@pytest.mark.parametrize("arch", [{}, {"high": [1.0, 1.0]}, {"high": [0.0, 0.0]}, {"block": "attention"}],
                         ids=["mixer", "all-conv", "all-attention", "attention"])
def test_unet_forward_backward_and_learned_sigma_output(arch) -> None:
    model = _unet(**arch)
    randomize_(model, seed=0, std=0.05)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99]), torch.tensor([1, 2, 3, 10])
    out = model(x, t, y)
    assert out.shape == (4, 2, 8, 8)                                    # ε and the variance head
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unet_refusals_and_token_transforms() -> None:
    with pytest.raises(ConfigError, match="model.arch.high: 3 fractions for 2 stages"):
        _unet(high=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="model.name: 'UNet-X' is not a known model"):
        load_config({"model": {"name": "UNet-X"}})
    with pytest.raises(ConfigError, match="methods.dtr: needs a model with transformer blocks"):
        build_all(tiny_config({"dtr": {}}, model={"name": "UNet-N"}), image_size=8, channels=1, num_classes=10)


def test_soft_interval_sampler_frequencies_match_p() -> None:
    """Statistical test with a fixed seed: the share drawn inside the expert's interval is
    p + (1 − p)·|I_n|/T (the complement is uniform over the full range); outside draws cover
    the whole range; ``neighbours`` draws only from the adjacent intervals."""
    intervals = Intervals.uniform(100, 4)
    n = 40_000
    for expert, p in [(0, 0.8), (1, 0.4), (3, 0.1), (2, 1.0)]:
        sampler = SoftIntervalSampler(intervals, expert, p)
        t, w = sampler.sample(n, torch.Generator().manual_seed(expert))
        inside = float((intervals.task_id(t) == expert).float().mean())
        expected = p + (1 - p) * 0.25
        assert abs(inside - expected) <= 4 * math.sqrt(expected * (1 - expected) / n), (expert, inside, expected)
        assert torch.equal(w, torch.ones(n))
        if p < 1:
            assert int(t.min()) == 0 and int(t.max()) == 99
    near = SoftIntervalSampler(intervals, 1, 0.5, outside="neighbours")
    t, _ = near.sample(n, torch.Generator().manual_seed(9))
    assert set(intervals.task_id(t).unique().tolist()) == {0, 1, 2}
    assert abs(float((intervals.task_id(t) == 1).float().mean()) - 0.5) < 0.02


def test_probability_schedules() -> None:
    assert [expert_probability(MemeConfig(), n, 4) for n in range(4)] == [0.8, 0.4, 0.2, 0.1]   # the paper's best
    assert [expert_probability(MemeConfig(soft="hard"), n, 4) for n in range(4)] == [1.0] * 4
    assert expert_probability(MemeConfig(soft="constant", p=0.6), 3, 4) == 0.6
    explicit = MemeConfig(soft="explicit", probabilities=(0.9, 0.5))
    assert expert_probability(explicit, 1, 2) == 0.5
    with pytest.raises(ConfigError, match="probabilities: 2 values for 3 experts"):
        expert_probability(explicit, 0, 3)


def test_expert_set_expansion_with_ramp_and_identical_control() -> None:
    base = tiny_config({"meme": {"ramp": {"r0": 1.0, "gamma_t": 0.5, "gamma_d": 0.5}}}, name="set",
                       model={"name": "UNet-N"}, intervals={"count": 3}, eval={"n": 8}, sample={"n": 4})
    experts = expert_configs(base)
    assert [e.name for e in experts] == ["set-expert0", "set-expert1", "set-expert2"]
    assert [e.methods.meme.expert for e in experts] == [0, 1, 2]
    assert all(e.eval.n == 0 and e.sample.n == 0 for e in experts)          # samples and FD are the set's
    assert [e.model.arch["high"] for e in experts] == [list(ramp_high(RampConfig(1.0, 0.5, 0.5), n, 2))
                                                       for n in range(3)]
    assert experts[0].model.arch["high"] == [0.5, pytest.approx(1 / 3, abs=1e-6)]     # r/(1+r): 1 and 0.5
    assert experts[0].model.arch["high"][0] > experts[2].model.arch["high"][0]        # low t: more conv
    same = expert_configs(base.replace(methods=load_config(
        {"methods": {"meme": {"identical": True, "ramp": {"r0": 1.0}}}}).methods))
    assert all(e.model == base.model for e in same)
    mixed = tiny_config({"meme": {"experts": [{"name": "UNet-N"}, {"name": "DiT-N/2"}]}}, name="mix",
                        intervals={"count": 2})
    assert [e.model.name for e in expert_configs(mixed)] == ["UNet-N", "DiT-N/2"]
    with pytest.raises(ConfigError, match="methods.meme.experts: 2 entries for intervals.count=4"):
        expert_configs(mixed.replace(intervals=load_config({"intervals": {"count": 4}}).intervals))
    with pytest.raises(ConfigError, match="methods.meme.ramp: sets the mixer ratios of U-Net experts; DiT-N/2"):
        expert_configs(tiny_config({"meme": {"ramp": {}}}, name="dit"))
    with pytest.raises(ConfigError, match="methods.meme.expert: this config describes a whole expert set"):
        build_all(base, image_size=8, channels=1, num_classes=10)


class _Constant(torch.nn.Module):
    """An 'expert' whose output is its index, to see where each sample went."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.calls: list[list[int]] = []

    def forward(self, x, t, y=None):
        self.calls.append(t.tolist())
        return torch.full((x.shape[0], 2, *x.shape[2:]), float(self.index))


def test_router_sends_every_timestep_to_its_interval_expert_including_edges() -> None:
    intervals, _ = resolve_intervals("log-snr", 100, 4, snr=GaussianDiffusion.from_config("linear", 100, True).snr
                                     .numpy())
    experts = [_Constant(n) for n in range(4)]
    router = ExpertRouter(intervals, experts)
    edges = sorted({b for b in intervals.bounds[:-1]} | {b - 1 for b in intervals.bounds[1:]})
    t = torch.tensor(edges + list(range(100)))
    out = router(torch.zeros(len(t), 1, 8, 8), t)
    assert torch.equal(out[:, 0, 0, 0].long(), intervals.task_id(t))
    for n, expert in enumerate(experts):                               # each expert saw only its own t
        lo, hi = intervals.pairs()[n]
        assert all(lo <= v < hi for call in expert.calls for v in call)


def test_router_with_respaced_sampling_and_lazy_loading() -> None:
    intervals = Intervals.uniform(100, 4)
    loaded = []

    def loader(n):
        def load():
            loaded.append(n)
            return _Constant(n)
        return load
    router = ExpertRouter(intervals, [loader(n) for n in range(4)], lazy=True)
    diffusion = GaussianDiffusion.from_config("linear", 100, True)
    seen = []
    original = router.forward

    def spy(x, t, y=None):
        seen.append((int(t[0]), int(router.intervals.task_id(t)[0])))
        assert len(router.resident) <= 1                                # only the active expert in memory
        return original(x, t, y)
    router.forward = spy
    sample(router, diffusion, (2, 1, 8, 8), steps=7, sampler="ddim", generator=torch.Generator().manual_seed(0))
    kept = diffusion.respaced(7).timestep_map.flip(0).tolist()
    assert [t for t, _ in seen] == kept                                  # original timesteps, not indices
    assert all(n == intervals.task_id(torch.tensor([t]))[0] for t, n in seen)
    assert loaded == [3, 2, 1, 0]                                        # high t first, each loaded once
