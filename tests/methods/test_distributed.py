"""Distribution rules of the method slots (docs/architecture.md, "distribution rules"), with two real CPU processes (gloo).

One spawn for the whole module: both ranks run every scenario and save what they saw; the tests
compare the ranks with each other and with one process holding the full global batch.

* One optimisation step on 2 ranks (half the global batch each) equals one step in one process,
  for vanilla (DDP), ANT-UW (own parameters synced like gradients), PCGrad and Nash-MTL
  (per-interval gradients reduced explicitly through the Runtime). The step's randomness is drawn
  for the global batch (``step.draw_randomness``), so with uniform t (``methods.ant.sampling=iid``)
  each rank gets exactly its slice of the one-process draw.
* The curriculum's pacing decision is identical on both ranks, step after step.

The comparison uses plain SGD with lr 1 in place of AdamW: the updated weights are then
``w − g``, a faithful readout of the gradient. (Adam's first step is ≈ ``lr·sign(g)``, which would
turn round-off in near-zero gradients into ±lr differences.)
"""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import batches_for, free_port, randomize_, tiny_config
from trainers.loop import build_state
from trainers.methods import Intervals
from trainers.runtime import DistRuntime, LocalRuntime
from trainers.step import draw_randomness, train_step

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

WORLD = 2
ONE_STEP = {
    "vanilla": {},
    "uw": {"ant": {"mtl": "uw", "sampling": "iid"}},
    "pcgrad": {"ant": {"mtl": "pcgrad", "sampling": "iid"}},
    "pcgrad-recompute": {"ant": {"mtl": "pcgrad", "sampling": "iid", "interval_grads": "recompute"}},
    "nash": {"ant": {"mtl": "nash", "sampling": "iid", "nash_every": 1}},
}
ADAPTIVE = {"clusters": 4, "pacing": "adaptive", "patience": 2, "ema": 0.0}
PACING = {
    "fixed": {"curriculum": {"clusters": 4, "pacing": "fixed", "stage_steps": 6}},
    "adaptive": {"curriculum": ADAPTIVE},
    "adaptive+uw": {"ant": {"mtl": "uw"}, "curriculum": ADAPTIVE},
}
PACING_STEPS = 30
# torch.compile under DDP (the model compiled, then wrapped): the same step as eager in one process.
COMPILED = {"dtr+uw": {"dtr": {}, "ant": {"mtl": "uw", "sampling": "iid"}}}
# Nash alternates explicit gradient reduction (refresh steps, DDP's no_sync) with DDP's own sync.
NASH_EVERY_2 = {"ant": {"mtl": "nash", "sampling": "iid", "nash_every": 2}}


def _one_step_config(methods: dict, compile: bool = False):
    return tiny_config(methods, train={"batch_size": 16, "steps": 1, "lr": 1e-3, "compile": compile})


def _one_step(methods: dict, runtime, rank: int = 0, world_size: int = 1, steps: int = 1, lr: float = 1.0,
              compile: bool = False) -> dict:
    cfg = _one_step_config(methods, compile)
    batches = batches_for(cfg, rank, world_size)
    state = build_state(cfg, runtime, batches)
    randomize_(state.raw_model, seed=11, std=0.05)      # identical on every rank; all params get gradients
    state.optimizer = torch.optim.SGD([{"params": g["params"]} for g in state.optimizer.param_groups], lr=lr)
    before = {k: v.clone() for k, v in state.raw_model.state_dict().items()}
    for step in range(steps):
        metrics = train_step(state, *batches.get(step), step)
    out = {"before": before, "model": {k: v.clone() for k, v in state.raw_model.state_dict().items()},
           "loss": torch.tensor(metrics["loss"], dtype=torch.float64)}
    if hasattr(state.plan.weighter, "log_vars"):
        out["uw"] = torch.stack([p.detach().clone() for p in state.plan.weighter.log_vars])
    if hasattr(state.plan.combiner, "alpha"):
        out["alpha"] = torch.as_tensor(state.plan.combiner.alpha).clone()
    return out


def _pacing(methods: dict, runtime, rank: int, world_size: int) -> dict:
    cfg = tiny_config(methods, train={"batch_size": 16, "steps": PACING_STEPS, "lr": 1e-3})
    batches = batches_for(cfg, rank, world_size)
    state = build_state(cfg, runtime, batches)
    stages, losses = [], []
    for step in range(PACING_STEPS):
        metrics = train_step(state, *batches.get(step), step)
        stages.append(state.plan.pacer.machine.num_active())
        losses.append(metrics["mse"])
    return {"stages": torch.tensor(stages), "mse": torch.tensor(losses, dtype=torch.float64),
            "pacer": state.plan.pacer.state_dict()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        runtime = DistRuntime()
        assert (runtime.rank, runtime.world_size, runtime.is_main) == (rank, WORLD, rank == 0)
        results: dict = {name: _one_step(methods, runtime, rank, WORLD) for name, methods in ONE_STEP.items()}
        results["nash-every-2"] = _one_step(NASH_EVERY_2, runtime, rank, WORLD, steps=4, lr=0.1)
        for name, methods in COMPILED.items():
            results[f"compiled/{name}"] = _one_step(methods, runtime, rank, WORLD, steps=2, lr=0.1, compile=True)
        for name, methods in PACING.items():
            results[f"pacing/{name}"] = _pacing(methods, runtime, rank, WORLD)
        cfg = tiny_config({"ant": {"mtl": "uw"}})                       # stratified, 8 per rank, K = 4
        state = build_state(cfg, runtime, batches_for(cfg, rank, WORLD))
        results["stratified_t"] = draw_randomness(state, 0, 8, (1, 8, 8))[0]
        results["reduced"] = runtime.all_reduce(torch.tensor([float(rank + 1)]), op="mean")
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_runtime_collectives(ranks) -> None:
    assert all(float(r["reduced"]) == 1.5 for r in ranks)


@pytest.mark.parametrize("name", list(ONE_STEP))
def test_one_step_on_two_ranks_equals_one_process(ranks, name: str) -> None:
    torch.set_num_threads(1)
    ref = _one_step(ONE_STEP[name], LocalRuntime())
    a, b = ranks[0][name], ranks[1][name]
    moved = 0
    for key, expected in ref["model"].items():
        assert torch.equal(a["before"][key], ref["before"][key]), key          # same start everywhere
        assert torch.equal(a["model"][key], b["model"][key]), key              # ranks agree exactly
        torch.testing.assert_close(a["model"][key], expected, atol=1e-5, rtol=1e-5, msg=key)
        moved += int(not torch.equal(expected, ref["before"][key]))
    assert moved > 0.9 * len(ref["model"])                                     # a real update
    assert float(a["loss"]) == float(b["loss"])
    assert float(a["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5)
    if name == "uw":
        assert torch.equal(a["uw"], b["uw"])                                   # synced own parameters
        torch.testing.assert_close(a["uw"], ref["uw"], atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(ref["uw"]) == 4
    if name == "nash":
        assert torch.equal(a["alpha"], b["alpha"])
        torch.testing.assert_close(a["alpha"], ref["alpha"], atol=1e-4, rtol=1e-4)
        assert not torch.equal(ref["alpha"], torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_model_under_ddp_equals_eager_in_one_process(ranks, name: str) -> None:
    torch.set_num_threads(1)
    ref = _one_step(COMPILED[name], LocalRuntime(), steps=2, lr=0.1)
    a, b = ranks[0][f"compiled/{name}"], ranks[1][f"compiled/{name}"]
    for key, expected in ref["model"].items():
        assert torch.equal(a["model"][key], b["model"][key]), key
        torch.testing.assert_close(a["model"][key], expected, atol=1e-5, rtol=1e-5, msg=key)
    assert float(a["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5)


def test_nash_alternating_sync_over_several_steps(ranks) -> None:
    torch.set_num_threads(1)
    ref = _one_step(NASH_EVERY_2, LocalRuntime(), steps=4, lr=0.1)
    a, b = ranks[0]["nash-every-2"], ranks[1]["nash-every-2"]
    for key, expected in ref["model"].items():
        assert torch.equal(a["model"][key], b["model"][key]), key
        torch.testing.assert_close(a["model"][key], expected, atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(a["alpha"], ref["alpha"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(PACING))
def test_pacing_decision_identical_on_both_ranks(ranks, name: str) -> None:
    a, b = ranks[0][f"pacing/{name}"], ranks[1][f"pacing/{name}"]
    assert torch.equal(a["mse"], b["mse"])                     # the monitored loss is the global one
    assert torch.equal(a["stages"], b["stages"])
    assert a["pacer"] == b["pacer"]
    assert int(a["stages"].max()) > 1 and int(a["stages"][0]) == 1, a["stages"]   # it did move
    if name == "fixed":
        expected = [min(4, 1 + (s + 1) // 6) for s in range(PACING_STEPS)]
        assert a["stages"].tolist() == expected


def test_stratified_sampling_is_per_rank(ranks) -> None:
    intervals = Intervals.uniform(100, 4)
    for r in ranks:
        assert intervals.task_id(r["stratified_t"]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not torch.equal(ranks[0]["stratified_t"], ranks[1]["stratified_t"])
