"""DMP (docs/methods.md, "DMP"): zero-initialised patch equals the pretrained model, the backbone
stays frozen, gates are distributions with exactly ⌊ρM⌋ kept slots, the balancing losses against
their closed forms, the paper's parameter overhead, and the refusals."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import batches_for, init_for, randomize_, tiny_config
from trainers.build import build_all, build_context, build_network
from trainers.checkpoint import load_state
from trainers.config import load_config
from trainers.errors import CheckpointError, ConfigError
from trainers.loop import build_state, train
from trainers.methods import compose, resolve_intervals
from trainers.methods.dmp import (DmpBalance, DmpConfig, PromptPatch, cv_squared, gate_usage, load_probability,
                                  patch_overhead, top_k_gate)
from trainers.reporting import LocalReporter, checkpoint_dir_name
from trainers.runtime import LocalRuntime
from trainers.step import train_step
from trainers.weights import check_frozen_base, is_adapter_key


def _inputs(n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((n, 1, 8, 8), generator=gen), torch.randint(0, 100, (n,), generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


def _patched(base_methods: dict, dmp: dict):
    """(base network, patched network) sharing the base's (randomised) backbone weights."""
    base, *_ = build_all(tiny_config(base_methods), image_size=8, channels=1, num_classes=10)
    randomize_(base, seed=3)
    patched, *_ = build_all(tiny_config({**base_methods, "dmp": dmp}), image_size=8, channels=1, num_classes=10)
    missing, unexpected = patched.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(is_adapter_key(k) for k in missing)
    return base, patched


@pytest.mark.parametrize("base_methods", [{}, {"dtr": {"active_ratio": 0.5}}], ids=["vanilla", "dtr"])
@pytest.mark.parametrize("mode", ["add", "prompt_tuning"])
def test_zero_initialised_patch_equals_the_pretrained_model_bit_for_bit(base_methods, mode) -> None:
    base, patched = _patched(base_methods, {"mode": mode})
    x, t, y = _inputs()
    for training in (False, True):               # noisy gating changes the gates, never the output
        base.train(training)
        patched.train(training)
        expected = base(x, t, y)
        assert torch.count_nonzero(expected) > 0
        assert torch.equal(patched(x, t, y), expected)


def test_xavier_init_and_prepend_mode_change_the_output() -> None:
    base, patched = _patched({}, {"mode": "add", "init": "xavier"})
    x, t, y = _inputs()
    assert not torch.allclose(patched.eval()(x, t, y), base.eval()(x, t, y))
    base, prepend = _patched({}, {"mode": "prepend", "num_prompts": 5})
    out = prepend.eval()(x, t, y)
    assert out.shape == base.eval()(x, t, y).shape                       # prompt tokens dropped at exit


def test_gates_are_distributions_and_top_k_keeps_exactly_floor_rho_m() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((32, 16), generator=gen)
    for rho in (1.0, 0.5, 0.25, 0.125, 0.3):
        k = math.floor(rho * 16)
        g = top_k_gate(logits, k)
        torch.testing.assert_close(g.sum(-1), torch.ones(32))
        assert (torch.count_nonzero(g, dim=-1) == k).all()
        kept = logits.topk(k, dim=-1).indices
        assert (g.gather(-1, kept) > 0).all()                             # the largest k are the kept ones
    patch = PromptPatch(DmpConfig(topk=0.25, init="xavier"), width=8, depth=3, num_prompts=16).train()
    patch.reseed(0)
    for index in range(3):
        g = patch.gates(torch.randn((5, 8), generator=gen), index)
        torch.testing.assert_close(g.sum(-1), torch.ones(5))
        assert (torch.count_nonzero(g, dim=-1) == 4).all()


def test_cv_squared_and_importance_loss_closed_form() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.rand((4, 7), generator=gen)
    v = values.double().numpy().ravel()
    assert float(cv_squared(values)) == pytest.approx(np.var(v, ddof=1) / (np.mean(v) ** 2 + 1e-10), rel=1e-5)
    assert float(cv_squared(torch.full((3, 3), 0.2))) == pytest.approx(0.0, abs=1e-9)
    # the balancing loss = λ_imp · CV²(Σ_l g_l) over all N×M entries
    model, patched = _patched({}, {"mode": "add", "init": "xavier", "importance_weight": 0.5})
    patched.train()
    patched(*_inputs())
    records = [r["gates"] for r in patched.adapters["dmp"].records]
    assert len(records) == len(patched.blocks)
    loss, terms = DmpBalance(DmpConfig(importance_weight=0.5))(patched)
    importance = torch.stack(records).sum(0)
    torch.testing.assert_close(loss, 0.5 * cv_squared(importance))
    assert set(terms) == {"dmp/importance_cv2"}                        # ρ = 1: no load term


def test_load_probability_matches_resampling_the_noise() -> None:
    """Shazeer's smooth load: P(slot m stays in the top k when its own noise is redrawn)."""
    gen = torch.Generator().manual_seed(2)
    clean = torch.randn((3, 6), generator=gen)
    std = torch.rand((3, 6), generator=gen) + 0.2
    noisy = clean + torch.randn((3, 6), generator=gen) * std
    k = 2
    prob = load_probability(clean, noisy, std, k)
    draws = 40_000
    for n in range(3):
        for m in range(6):
            others = torch.cat([noisy[n, :m], noisy[n, m + 1:]])
            threshold = others.topk(k).values[-1]                          # m must beat the k-th of the rest
            resampled = clean[n, m] + torch.randn(draws, generator=gen) * std[n, m]
            freq = float((resampled > threshold).float().mean())
            assert abs(freq - float(prob[n, m])) < 0.015, (n, m, freq, float(prob[n, m]))


def test_load_term_only_below_full_top_k() -> None:
    _, patched = _patched({}, {"mode": "add", "topk": 0.5, "init": "xavier"})
    patched.train()
    patched.adapters["dmp"].reseed(0)
    patched(*_inputs())
    loss, terms = DmpBalance(DmpConfig(topk=0.5, load_weight=2.0))(patched)
    assert set(terms) == {"dmp/importance_cv2", "dmp/load"} and float(terms["dmp/load"]) > 0
    torch.testing.assert_close(loss, terms["dmp/importance_cv2"] + 2.0 * terms["dmp/load"])


@pytest.mark.parametrize("name, paper", [("DiT-B/2", 0.0196), ("DiT-L/2", 0.0143)])
def test_parameter_overhead_matches_the_paper(name: str, paper: float) -> None:
    """256 tokens (256 px images, 32x32x4 latents, patch 2). The paper's count is prompts + gate;
    the noise projection (training only) is not in it."""
    cfg = load_config({"model": {"name": name}, "methods": {"dmp": {}}})
    ctx = build_context(cfg, resolve_intervals("uniform", 1000, 5)[0], 1)
    plan = compose(cfg.methods, ctx)
    with torch.device("meta"):                                            # shapes only: no memory
        model, _ = build_network(cfg, image_size=32, channels=4, num_classes=1000, plan=plan, ctx=ctx, seed=0)
    overhead = patch_overhead(model)
    assert overhead["prompts"] == len(model.blocks) * 256 * model.width
    assert abs(overhead["overhead"] - paper) < 0.0005, overhead


def test_training_keeps_the_backbone_and_trains_prompts_and_gate(tmp_path: Path) -> None:
    cfg = tiny_config({"dtr": {"active_ratio": 0.5}, "dmp": {"lr": 1e-2}}, train={"steps": 4})
    init = init_for(cfg)
    batches = batches_for(cfg)
    state = build_state(cfg, LocalRuntime(), batches, init=init, base_ref={"uri": "u", "sha256": "s"})
    before = {k: v.clone() for k, v in state.raw_model.state_dict().items()}
    metrics = [train_step(state, *batches.get(step), step) for step in range(4)]
    after = state.raw_model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]) != is_adapter_key(key), key   # only the patch moved
    names = [g["name"] for g in state.optimizer.param_groups]
    assert names == ["dmp_prompts", "dmp_gate"]
    assert [g["lr"] for g in state.optimizer.param_groups] == [1e-2, 1e-1]     # gate_lr_scale 10
    assert all(not p.requires_grad for n, p in state.raw_model.named_parameters() if not is_adapter_key(n))
    assert all("dmp/importance_cv2" in m and m["loss"] > 0 for m in metrics)
    usage = gate_usage(state.ema.model, 100, ranges=4, num_classes=10)
    assert usage.shape == (4, 16)
    torch.testing.assert_close(usage.sum(-1), torch.ones(4))


def test_gate_usage_summary_is_written_at_the_end(tmp_path: Path) -> None:
    import json
    cfg = tiny_config({"dmp": {"lr": 1e-2}}, train={"steps": 2})
    train(cfg, LocalRuntime(), LocalReporter(tmp_path), batches_for(cfg), init=init_for(cfg),
          base_ref={"uri": "u", "sha256": "s"})
    summary = json.loads((tmp_path / "artifacts" / "summaries" / "dmp_gate_usage.json").read_text())
    assert summary["kind"] == "heatmap" and len(summary["values"]) == len(summary["rows"]) == 10
    assert all(abs(sum(row) - 1) < 1e-5 for row in summary["values"])


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="num_prompts: add mode adds prompt m to token m.*16"):
        build_all(tiny_config({"dmp": {"num_prompts": 8}}), image_size=8, channels=1, num_classes=10)
    with pytest.raises(ConfigError, match="methods.dmp.topk"):
        tiny_config({"dmp": {"topk": 0.0}})
    with pytest.raises(ConfigError, match="methods.dmp.depth: 9 exceeds the model's 4 blocks"):
        build_all(tiny_config({"dmp": {"depth": 9}}), image_size=8, channels=1, num_classes=10)
    base = tiny_config({"dtr": {"active_ratio": 0.5}})
    for patch, match in [(tiny_config({"dtr": {"active_ratio": 0.5}, "dmp": {}}, diffusion={"schedule": "cosine"}),
                          "diffusion.schedule: the base checkpoint .* was trained with 'linear', this run has 'cosine'"),
                         (tiny_config({"dmp": {}}), "methods.dtr: the base checkpoint .* was trained with dtr"),
                         (tiny_config({"dtr": {"active_ratio": 0.8}, "dmp": {}}), "methods.dtr: .*active_ratio"),
                         (tiny_config({"dtr": {"active_ratio": 0.5}, "dmp": {}}, model={"name": "DiT-T/2"}),
                          "model.name: the base checkpoint")]:
        with pytest.raises(CheckpointError, match=match):
            check_frozen_base(base.to_dict(), patch, "base")
    check_frozen_base(base.to_dict(), tiny_config({"dtr": {"active_ratio": 0.5}, "dmp": {}}), "base")   # accepted


def test_fine_tuning_and_prompt_tuning_baselines(tmp_path: Path) -> None:
    ft = tiny_config({"dmp": {"mode": "fine_tuning"}}, train={"steps": 2})
    plan = build_all(ft, image_size=8, channels=1, num_classes=10)[2]
    assert not plan.freeze_backbone and plan.transforms == [] and plan.aux_losses == []
    pt = tiny_config({"dmp": {"mode": "prompt_tuning"}}, train={"steps": 2})
    model, _, plan, _, _ = build_all(pt, image_size=8, channels=1, num_classes=10)
    assert plan.freeze_backbone and plan.aux_losses == [] and model.adapters["dmp"].gate is None
    summary = train(pt, LocalRuntime(), LocalReporter(tmp_path), batches_for(pt), init=init_for(pt),
                    base_ref={"uri": "u", "sha256": "s"})
    state = load_state(tmp_path / checkpoint_dir_name(2))
    assert summary["step"] == 2 and set(state["model"]) == {"adapters.dmp.prompts"}
