"""The method slots as bound by ``compose()``: DTR routing in the model, timestep samplers, the UW
weighter under the curriculum, the refusals of ``compose`` and the plan description."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import batches_for, init_for, methods_for, randomize_, tiny_config
from trainers.build import build_all, build_context, resolve_run_intervals
from trainers.config import load_config
from trainers.diffusion import sample
from trainers.errors import ConfigError
from trainers.loop import build_state
from trainers.methods import Intervals, compose, supported_combinations
from trainers.methods.dtr import DtrRouter
from trainers.methods.routing import routing_masks
from trainers.methods.samplers import StratifiedSampler, UniformSampler
from trainers.models.contract import Conditioning
from trainers.models.dit import DiTBlock, modulate
from trainers.runtime import LocalRuntime
from trainers.step import train_step

COMBINATIONS = sorted(supported_combinations())


def _build(cfg, world_size: int = 1):
    return build_all(cfg, image_size=8, channels=1, num_classes=10, world_size=world_size)


def _observe(plan, loss: float) -> bool:
    """What the step does with the global loss: feed the pacer, re-narrow the sampler on a move."""
    moved = plan.pacer.observe(loss)
    if moved:
        plan.sync_pacer()
    return moved


# -------------------------------------------------------------------------------------- DTR
def test_routed_block_equals_the_formula_by_hand() -> None:
    torch.manual_seed(0)
    block = randomize_(DiTBlock(16, 4), seed=1, std=0.2)
    masks = routing_masks(10, 16, 0.5, 1.0)                                   # [10, 16]
    router = DtrRouter(masks, num_timesteps=10, blocks=(0,))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, 5, 16), generator=gen)
    c = torch.randn((4, 16), generator=gen)
    t = torch.tensor([0, 3, 6, 9])
    m = masks[t].unsqueeze(1)                                                 # [N, 1, C]

    def routed(x, c, t):
        return router.forward_block(0, x, Conditioning(c, t, c), inner=lambda u: block(u, c, t))
    y = routed(x, c, t)
    assert torch.equal(y, block(m * x, c, t) + (1 - m) * x)                   # y = Block(m⊙x) + (1−m)⊙x
    # The paper's block, written out: u = m⊙x; u += g·Attn(mod(LN u)); u += g·MLP(mod(LN u)); y = u + (1−m)⊙x
    sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
    u = m * x
    u = u + g1.unsqueeze(1) * block.attn(modulate(block.norm1(u), sh1, sc1))
    u = u + g2.unsqueeze(1) * block.mlp(modulate(block.norm2(u), sh2, sc2))
    torch.testing.assert_close(y, u + (1 - m) * x)
    # With zero gates the sub-layers write nothing and (1−m)⊙x restores the masked-out channels:
    # the routed block is then the identity, exactly.
    with torch.no_grad():
        block.adaLN_modulation[-1].weight.zero_()
        block.adaLN_modulation[-1].bias.zero_()
    assert torch.equal(routed(x, c, t), x)


def test_dtr_routes_every_block_and_not_the_final_layer() -> None:
    model, *_ = _build(tiny_config({"dtr": {"active_ratio": 0.8}}))
    router = model.adapters["dtr"]
    assert isinstance(router, DtrRouter) and router.blocks == frozenset(range(len(model.blocks)))
    assert all(type(b).__name__ == "DiTBlock" for b in model.blocks)         # blocks are not replaced
    only = _build(tiny_config({"dtr": {"blocks": [1, 3]}}))[0]
    assert only.adapters["dtr"].blocks == frozenset({1, 3})
    randomize_(only, seed=3)
    gen = torch.Generator().manual_seed(0)
    h, c, t = torch.randn((2, 16, 64), generator=gen), torch.randn((2, 64), generator=gen), torch.tensor([90, 99])
    for i, block in enumerate(only.blocks):                                   # unrouted blocks see x as is
        assert torch.equal(only._run_block(i, h, Conditioning(c, t, c)), block(h, c, t)) == (i not in (1, 3))
    with pytest.raises(ConfigError, match="methods.dtr.blocks"):
        _build(tiny_config({"dtr": {"blocks": [7]}}))


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_dtr_adds_no_parameters(ratio: float) -> None:
    vanilla, *_ = _build(tiny_config({}))
    routed, *_ = _build(tiny_config({"dtr": {"active_ratio": ratio}}))
    assert sum(p.numel() for p in routed.parameters()) == sum(p.numel() for p in vanilla.parameters())
    assert [p.shape for p in routed.parameters()] == [p.shape for p in vanilla.parameters()]
    assert list(routed.state_dict()) == list(vanilla.state_dict())     # no key renamed, masks not saved


def _inputs(n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((n, 1, 8, 8), generator=gen), torch.randint(0, 100, (n,), generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


def test_dtr_beta_one_equals_vanilla_bit_for_bit() -> None:
    vanilla, *_ = _build(tiny_config({}))
    routed, *_ = _build(tiny_config({"dtr": {"active_ratio": 1.0, "alpha": 4.0}}))
    for p, q in zip(vanilla.parameters(), routed.parameters()):
        assert torch.equal(p, q)                                 # same seed, no RNG drawn by DTR
    randomize_(vanilla, seed=5)
    randomize_(routed, seed=5)
    x, t, y = _inputs()
    out = vanilla(x, t, y)
    assert torch.count_nonzero(out) > 0
    assert torch.equal(routed(x, t, y), out)
    half, *_ = _build(tiny_config({"dtr": {"active_ratio": 0.5}}))
    randomize_(half, seed=5)
    assert not torch.allclose(half(x, t, y), out)


def test_dtr_mask_is_gathered_by_the_original_timestep() -> None:
    model, diffusion, *_ = _build(tiny_config({"dtr": {"active_ratio": 0.5, "alpha": 1.0}}))
    randomize_(model, seed=2)
    router = model.adapters["dtr"]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn((1, 16, 64), generator=gen)
    c = torch.randn((1, 64), generator=gen)
    # t enters a routed block only through its mask: same c, different t -> different output...
    out = {t: model._run_block(0, h, Conditioning(c, torch.tensor([t]), c)) for t in (0, 1, 50, 99)}
    assert not torch.allclose(out[0], out[99]) and not torch.allclose(out[50], out[99])
    # ...and timesteps sharing a window (s(t) = round(t/99 * 32)) give the same output.
    assert torch.equal(router.masks[0], router.masks[1]) and torch.equal(out[0], out[1])
    # Respaced sampling hands the blocks ORIGINAL timesteps (0..T−1), never respaced indices.
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["t"].clone()),
                                                       with_kwargs=True)
    sample(model, diffusion, (2, 1, 8, 8), steps=5, sampler="ddim", y=torch.tensor([1, 2]), null_class=10,
           guidance=1.0, generator=torch.Generator().manual_seed(0))
    handle.remove()
    kept = diffusion.respaced(5).timestep_map
    assert torch.equal(torch.stack(seen)[:, 0], kept.flip(0)) and int(kept.max()) == 99


# --------------------------------------------------------------------------------- samplers
def test_stratified_sampler_exact_counts_in_interval_order() -> None:
    plan = _build(tiny_config({"ant": {"mtl": "uw"}}))[2]
    sampler, intervals = plan.sampler, Intervals.uniform(100, 4)
    assert isinstance(sampler, StratifiedSampler)
    for seed in range(5):
        t, w = sampler.sample(16, torch.Generator().manual_seed(seed))
        assert t.dtype == torch.int64 and t.shape == (16,)
        assert w.shape == (16,) and w.dtype == torch.float32 and torch.equal(w, torch.ones(16))
        assert intervals.task_id(t).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_stratified_sampler_uneven_intervals() -> None:
    intervals = Intervals((0, 1, 3, 50, 100))
    t, _ = StratifiedSampler(intervals).sample(8, torch.Generator().manual_seed(0))
    assert intervals.task_id(t).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert t[:2].tolist() == [0, 0]                                 # the 1-wide interval is {0}


def test_iid_sampler_is_uniform_over_timesteps() -> None:
    plan = _build(tiny_config({"ant": {"mtl": "uw", "sampling": "iid"}}))[2]
    assert type(plan.sampler) is UniformSampler
    n = 40_000
    t, w = plan.sampler.sample(n, torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(n))
    counts = torch.bincount(t, minlength=100).float()
    assert t.min() == 0 and t.max() == 99 and counts.shape == (100,)
    expected = n / 100
    assert (counts - expected).abs().max() < 5 * expected ** 0.5       # 5 sigma, every timestep
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 160                                               # 99 dof; p ≈ 1e-4
    vanilla = _build(tiny_config({}))[2].sampler
    assert type(vanilla) is UniformSampler and vanilla.active_intervals().all()


def test_curriculum_restricts_t_to_active_clusters_and_advances() -> None:
    cfg = tiny_config({"curriculum": {"clusters": 4, "pacing": "fixed", "stage_steps": 1}})
    plan = _build(cfg)[2]
    assert plan.pacer.clusters == Intervals.uniform(100, 4)          # an Intervals, like ANT's
    gen = torch.Generator().manual_seed(0)
    for stage, lo in [(1, 75), (2, 50), (3, 25), (4, 0)]:
        assert plan.pacer.machine.num_active() == stage
        t, _ = plan.sampler.sample(2000, gen)
        assert int(t.min()) == lo and int(t.max()) == 99           # easy (high t) first, accumulating
        assert plan.pacer.metrics()["curriculum/stage"] == stage
        assert _observe(plan, 1.0) == (stage < 4)
    assert plan.pacer.machine.num_active() == 4                     # the last stage never ends


def test_adaptive_curriculum_advances_on_plateau() -> None:
    cfg = tiny_config({"curriculum": {"clusters": 3, "pacing": "adaptive", "patience": 2, "ema": 0.0}})
    plan = _build(cfg)[2]
    moves = [_observe(plan, loss) for loss in [1.0, 0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7]]
    assert moves == [False, False, False, False, True, False, False, True]
    assert int(plan.sampler.sample(500, torch.Generator().manual_seed(0))[0].min()) == 0


def test_ant_with_curriculum_stratifies_over_active_intervals_only() -> None:
    cfg = tiny_config({"ant": {"mtl": "uw"}, "curriculum": {"clusters": 2, "pacing": "fixed", "stage_steps": 1}})
    plan, intervals = _build(cfg)[2], Intervals.uniform(100, 4)
    sampler = plan.sampler
    assert sampler.active_intervals().tolist() == [False, False, True, True]
    t, _ = sampler.sample(16, torch.Generator().manual_seed(0))
    assert intervals.task_id(t).tolist() == [2] * 8 + [3] * 8
    _observe(plan, 1.0)
    assert sampler.active_intervals().all()
    t, _ = sampler.sample(16, torch.Generator().manual_seed(0))
    assert intervals.task_id(t).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_uw_params_of_inactive_intervals_get_no_gradient_and_do_not_move() -> None:
    cfg = tiny_config({"ant": {"mtl": "uw"}, "curriculum": {"clusters": 2, "pacing": "fixed", "stage_steps": 100}},
                      train={"lr": 1e-3})
    batches = batches_for(cfg)
    state = build_state(cfg, LocalRuntime(), batches)
    log_vars = list(state.plan.weighter.log_vars)
    seen = []
    step_fn = state.optimizer.step

    def spy(*args, **kwargs):
        seen.append([p.grad is None for p in log_vars])
        return step_fn(*args, **kwargs)

    state.optimizer.step = spy
    for step in range(3):
        train_step(state, *batches.get(step), step)
    assert seen == [[True, True, False, False]] * 3
    values = [float(p.detach()) for p in log_vars]
    assert values[:2] == [0.0, 0.0] and all(v != 0.0 for v in values[2:])
    assert all(len(state.optimizer.state[p]) == 0 for p in log_vars[:2])       # Adam never touched them
    assert all(len(state.optimizer.state[p]) > 0 for p in log_vars[2:])
    assert state.plan.weighter.param_groups()[0].lr == 0.025 and state.optimizer.param_groups[1]["lr"] == 0.025


# ----------------------------------------------------------------------------------- compose
@pytest.mark.parametrize("key", COMBINATIONS, ids=lambda k: "+".join(k) or "vanilla")
def test_every_tested_combination_composes(key) -> None:
    model, _, plan, intervals, _ = _build(tiny_config(methods_for(key)))
    assert plan.key == key and intervals.num_intervals == 4
    assert plan.describe()["methods"] == ("+".join(key) or "vanilla")


@pytest.mark.parametrize("mtl", ["pcgrad", "nash"])
def test_compose_refuses_gradient_mtl_with_curriculum(mtl: str) -> None:
    with pytest.raises(ConfigError) as err:
        _build(tiny_config({"ant": {"mtl": mtl}, "curriculum": {}}))
    msg = str(err.value)
    assert msg.startswith("methods:") and f"ant-{mtl} + curriculum" in msg and "methods.ant.mtl=uw" in msg
    assert "\n" not in msg


def test_compose_refuses_stratified_batch_not_divisible() -> None:
    with pytest.raises(ConfigError) as err:
        _build(tiny_config({"ant": {"mtl": "uw"}}, train={"batch_size": 10}))
    msg = str(err.value)
    assert msg.startswith("train.batch_size") and "intervals.count=4" in msg and "sampling=iid" in msg
    # Per worker: 16 over 4 workers is 4 per rank, not divisible by 8 intervals.
    cfg = tiny_config({"ant": {"mtl": "uw"}}, intervals={"count": 8}, scaling={"num_workers": 4})
    intervals, _ = resolve_run_intervals(cfg)
    with pytest.raises(ConfigError, match="per-worker batch 4"):
        compose(cfg.methods, build_context(cfg, intervals, world_size=4))
    ok = tiny_config({"ant": {"mtl": "uw", "sampling": "iid"}}, train={"batch_size": 10})
    assert type(_build(ok)[2].sampler) is UniformSampler


def test_unknown_mtl_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"^methods\.ant\.mtl: 'gradnorm' is not one of 'uw', 'pcgrad', 'nash'"):
        load_config({}, ["methods.ant.mtl=gradnorm"])


def test_plan_describe() -> None:
    vanilla = _build(tiny_config({}))[2]
    assert vanilla.describe() == {"methods": "vanilla", "transforms": "none", "sampler": "default",
                                  "pacer": "default", "weighter": "default", "combiner": "default"}
    full = _build(tiny_config(methods_for(("ant-uw", "curriculum", "dtr"))))[2]
    assert full.describe() == {"methods": "ant-uw+curriculum+dtr", "transforms": "dtr", "sampler": "ant-uw",
                               "pacer": "curriculum", "weighter": "ant-uw", "combiner": "default"}
    nash = _build(tiny_config(methods_for(("ant-nash",))))[2]
    assert nash.describe()["combiner"] == "ant-nash" and nash.describe()["weighter"] == "default"
    assert json.loads(json.dumps(full.describe())) == full.describe()       # loggable as-is
    assert type(nash.combiner).__name__ == "NashCombiner" and nash.combiner.every == 2


@pytest.mark.parametrize("key", COMBINATIONS, ids=lambda k: "+".join(k) or "vanilla")
def test_plugin_state_round_trips(key) -> None:
    """Every stateful plug-in restores its state into a freshly composed plan."""
    cfg = tiny_config(methods_for(key))
    batches = batches_for(cfg)
    state = build_state(cfg, LocalRuntime(), batches, init=init_for(cfg))
    for step in range(3):
        train_step(state, *batches.get(step), step)
    saved = {name: obj.state_dict() for name, obj in state.plan.stateful().items()}
    fresh = _build(cfg)[2]
    for name, obj in fresh.stateful().items():
        obj.load_state_dict(saved[name])
    fresh.sync_pacer()                       # the sampler's restriction is the pacer's state
    for name, obj in fresh.stateful().items():
        assert json.dumps(obj.metrics(), sort_keys=True) == json.dumps(state.plan.stateful()[name].metrics(),
                                                                       sort_keys=True)
    assert torch.equal(fresh.sampler.active_intervals(), state.plan.sampler.active_intervals())


def test_token_backbone_is_recognised_by_its_attributes() -> None:
    """DTR and DMP need a token backbone. Python 3.12's ``isinstance`` against a protocol looks
    attributes up statically and misses an nn.Module's submodules (every DiT was refused on the
    3.12 GPU machine); the check goes by plain attribute lookup."""
    import inspect

    from trainers.models.contract import is_token_backbone
    dit, *_ = _build(tiny_config({}))
    unet, *_ = _build(tiny_config({}, model={"name": "UNet-N"}))
    with pytest.raises(AttributeError):
        inspect.getattr_static(dit, "blocks")               # what the static lookup sees
    assert is_token_backbone(dit) and not is_token_backbone(unet)
