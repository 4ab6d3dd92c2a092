"""The method registry is open: a method defined and registered here, in a test file, composes,
trains, checkpoints and resumes without any edit to the core (compose, step, MethodsConfig,
loop). It also exercises every requirement a plug-in can declare: a parameter group with its own
learning rate, parameters the EMA follows instead of averaging, and a frozen backbone."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.helpers import batches_for, tiny_config
from trainers.checkpoint import load_state
from trainers.errors import ConfigError
from trainers.loop import build_state, train
from trainers.methods import METHODS, Contribution, MethodDescriptor, ParamGroup, register, unregister
from trainers.methods.protocols import TransformBase
from trainers.methods.weighters import MeanWeighter
from trainers.models.contract import BlockAdapter
from trainers.reporting import LocalReporter, checkpoint_dir_name
from trainers.runtime import LocalRuntime
from trainers.step import train_step
from trainers.weights import is_adapter_key


@dataclass(frozen=True)
class TokenBiasConfig:
    lr: float = 0.05
    scale: float = 2.0          # the weighter multiplies the mean loss by this


class TokenBias(BlockAdapter):
    """Adds a learnable vector to the tokens before every block (zero-initialised)."""

    def __init__(self, width: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width))

    def forward_block(self, index, x, cond, inner):
        return inner(x + self.bias)


class TokenBiasTransform(TransformBase):
    name = "token_bias"

    def __init__(self, cfg: TokenBiasConfig):
        self.cfg = cfg

    def apply(self, model, ctx):
        model.add_adapter("token_bias", TokenBias(model.width))
        return model

    def param_groups(self, model):
        return [ParamGroup("token_bias", [model.adapters["token_bias"].bias], lr=self.cfg.lr, ema=False)]


class ScaledMean(MeanWeighter):
    name = "scaled_mean"

    def __init__(self, scale: float):
        self.scale = scale

    def reduce(self, task_loss, task_count, active):
        return self.scale * super().reduce(task_loss, task_count, active)


def _build(cfg: TokenBiasConfig, ctx) -> Contribution:
    return Contribution(transforms=[TokenBiasTransform(cfg)], weighter=ScaledMean(cfg.scale), freeze_backbone=True)


@pytest.fixture
def token_bias():
    desc = register(MethodDescriptor(name="token_bias", config=TokenBiasConfig, build=_build,
                                     claims=lambda cfg: ("transform", "weighter"),
                                     examples={"token_bias": {"lr": 0.05}}))
    yield desc
    unregister("token_bias")
    assert "token_bias" not in METHODS


def _pretrained(tmp_path: Path) -> dict:
    cfg = tiny_config({}, train={"steps": 2, "checkpoint_every": 2})
    train(cfg, LocalRuntime(), LocalReporter(tmp_path / "base"), batches_for(cfg))
    return load_state(tmp_path / "base" / checkpoint_dir_name(2))


def test_a_method_registered_from_a_test_file_composes_and_trains(tmp_path: Path, token_bias) -> None:
    base = _pretrained(tmp_path)
    cfg = tiny_config({"token_bias": {"lr": 0.05}}, train={"steps": 4, "checkpoint_every": 2})
    assert cfg.methods.token_bias == TokenBiasConfig(lr=0.05)
    batches = batches_for(cfg)
    state = build_state(cfg, LocalRuntime(), batches, init=base, base_ref={"uri": "mem://base", "sha256": "x"})
    assert state.plan.describe()["weighter"] == "token_bias" and state.plan.freeze_backbone
    before = {k: v.clone() for k, v in state.raw_model.state_dict().items()}
    for step in range(4):
        train_step(state, *batches.get(step), step)
    after = state.raw_model.state_dict()
    # frozen backbone: bit-identical, out of the optimizer, requires_grad off
    for key, value in before.items():
        if not is_adapter_key(key):
            assert torch.equal(after[key], value), key
    assert all(not p.requires_grad for n, p in state.raw_model.named_parameters() if not is_adapter_key(n))
    bias = state.raw_model.adapters["token_bias"].bias
    assert torch.count_nonzero(bias) > 0
    groups = state.optimizer.param_groups
    assert [g["name"] for g in groups] == ["token_bias"] and groups[0]["lr"] == 0.05
    assert [p for g in groups for p in g["params"]] == [bias]
    # ema=False: the EMA copy follows the live value; the frozen backbone equals the base EMA
    assert torch.equal(state.ema.model.adapters["token_bias"].bias, bias.detach())
    assert torch.equal(state.ema.model.blocks[0].attn.qkv.weight, base["ema"]["blocks.0.attn.qkv.weight"])


def test_frozen_backbone_checkpoints_reference_the_base_and_resume_exactly(tmp_path: Path, token_bias) -> None:
    base = _pretrained(tmp_path)
    cfg = tiny_config({"token_bias": {}}, train={"steps": 4, "checkpoint_every": 2})
    ref = {"uri": str(tmp_path / "base"), "sha256": "abc"}
    train(cfg, LocalRuntime(), LocalReporter(tmp_path / "full", keep=5), batches_for(cfg), init=base, base_ref=ref)
    mid = load_state(tmp_path / "full" / checkpoint_dir_name(2))
    assert set(mid["model"]) == set(mid["ema"]) == {"adapters.token_bias.bias"}      # no copy of the backbone
    assert mid["base"] == ref
    with pytest.raises(ConfigError, match="frozen, pretrained backbone.*was not loaded"):
        train(cfg, LocalRuntime(), LocalReporter(tmp_path / "x"), batches_for(cfg), resume=mid)
    train(cfg, LocalRuntime(), LocalReporter(tmp_path / "resumed", keep=5), batches_for(cfg), resume=mid, init=base)
    end = load_state(tmp_path / "full" / checkpoint_dir_name(4))
    resumed = load_state(tmp_path / "resumed" / checkpoint_dir_name(4))
    assert torch.equal(end["model"]["adapters.token_bias.bias"], resumed["model"]["adapters.token_bias.bias"])
    assert resumed["base"] == ref


def test_a_frozen_backbone_needs_a_base(token_bias) -> None:
    cfg = tiny_config({"token_bias": {}})
    with pytest.raises(ConfigError, match="init_from: methods token_bias train on a frozen, pretrained backbone"):
        build_state(cfg, LocalRuntime(), batches_for(cfg))


def test_single_owner_slot_claimed_twice_names_both_methods(token_bias) -> None:
    cfg = tiny_config({"ant": {"mtl": "uw"}, "token_bias": {}})
    with pytest.raises(ConfigError, match="ant-uw and token_bias both claim the weighter slot"):
        build_state(cfg, LocalRuntime(), batches_for(cfg))


def test_untested_combination_is_refused(token_bias) -> None:
    cfg = tiny_config({"dtr": {}, "token_bias": {}})
    with pytest.raises(ConfigError, match="combination dtr \\+ token_bias is not supported"):
        build_state(cfg, LocalRuntime(), batches_for(cfg))


def test_unregistered_methods_are_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="methods.token_bias: unknown key"):
        tiny_config({"token_bias": {}})
