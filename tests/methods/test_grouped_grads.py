"""One-backward per-interval gradients equal the K separate gradients (PCGrad / Nash input)."""
from __future__ import annotations

import pytest
import torch

from trainers.config import load_config
from trainers.data import StepBatches, load_digits
from trainers.loop import build_state
from trainers.methods.combiners import interval_gradients
from trainers.methods.grouped_grads import GroupedGradientCapture
from trainers.runtime import LocalRuntime
from trainers.step import _per_sample_loss


def _setup(methods: dict):
    cfg = load_config({"model": {"name": "DiT-N/2"}, "diffusion": {"steps": 100}, "intervals": {"count": 4},
                       "methods": methods, "train": {"batch_size": 16}})
    batches = StepBatches(load_digits(), 16)
    state = build_state(cfg, LocalRuntime(), batches)
    with torch.no_grad():                                   # leave adaLN-Zero so every layer has gradients
        g = torch.Generator().manual_seed(0)
        for p in state.raw_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return state, batches


def _interval_losses(state, batches):
    """(per-interval mean losses [K], interval of each sample [N], active intervals [K]) of step 0."""
    loss_n, _, draw = _per_sample_loss(state, *batches.get(0), 0)
    task = draw.task
    assert torch.equal(draw.counts, torch.bincount(task, minlength=4))       # one rank: global = local
    counts = torch.bincount(task, minlength=4).float()
    return torch.zeros(4).index_add(0, task, loss_n) / counts.clamp(min=1), task, counts > 0


@pytest.mark.parametrize("methods", [{"ant": {"mtl": "pcgrad"}}, {"dtr": {}, "ant": {"mtl": "pcgrad", "sampling": "iid"}}])
def test_grouped_equals_separate_backwards(methods):
    state, batches = _setup(methods)
    params = state.trainable()
    capture = GroupedGradientCapture(state.raw_model, params)
    assert capture.complete
    with capture:
        task_loss, task, active = _interval_losses(state, batches)
        reference = interval_gradients(task_loss, active, params, LocalRuntime())          # batched backward
        assert capture.usable()
        grouped = capture.gradients(task_loss.sum(), task, active)
    assert grouped.shape == reference.shape
    assert torch.allclose(grouped, reference, atol=1e-5, rtol=1e-4)
    assert (grouped[~active] == 0).all()


def test_layer_used_twice_falls_back():
    state, batches = _setup({"ant": {"mtl": "pcgrad"}})
    capture = GroupedGradientCapture(state.raw_model, state.trainable())
    x0, y = batches.get(0)
    with capture:
        state.raw_model(x0, torch.zeros(16, dtype=torch.long), y)
        state.raw_model(x0, torch.zeros(16, dtype=torch.long), y)
        assert not capture.usable()


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "recompute"])
@pytest.mark.parametrize("methods", [{"ant": {"mtl": "pcgrad"}}, {"dtr": {}, "ant": {"mtl": "nash", "sampling": "iid"}}])
def test_layerwise_gram_and_weighted_sum_equal_the_dense_matrix(methods, keep):
    """PCGrad/Nash see the interval gradients only as G = g gᵀ and Σ_k w_k g_k: built layer by
    layer (one batched GEMM per layer), with the update from the kept per-layer gradients or
    recomputed in one weighted pass, they equal the K separate gradients'."""
    from trainers.methods.mtl.pcgrad import pcgrad, pcgrad_weights
    state, batches = _setup(methods)
    params = state.trainable()
    capture = GroupedGradientCapture(state.raw_model, params)
    with capture:
        task_loss, task, active = _interval_losses(state, batches)
        reference = interval_gradients(task_loss, active, params, LocalRuntime())          # [K, P]
        layerwise = capture.task_gradients(task_loss.sum(), task, active, LocalRuntime(), keep=keep)
    assert bool(layerwise.kept) is keep
    dense = reference.double() @ reference.double().T
    torch.testing.assert_close(layerwise.gram, dense, rtol=1e-4, atol=1e-7 * float(dense.abs().max()))
    weights = torch.tensor([0.7, -0.2, 0.4, 1.3], dtype=torch.float64) * active
    layerwise.write(weights)
    written = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(written, weights.float() @ reference, rtol=1e-4, atol=1e-6)
    gen = lambda: torch.Generator().manual_seed(3)                      # noqa: E731
    idx = torch.nonzero(active).flatten()
    w = pcgrad_weights(layerwise.gram[idx][:, idx], gen())
    torch.testing.assert_close((w.float() @ reference[idx]), pcgrad(reference[idx], gen()), rtol=1e-4, atol=1e-6)


def test_compile_leaves_the_per_interval_combiners_eager() -> None:
    """PCGrad/Nash read each layer's input and output gradient through hooks, which a compiled
    graph does not keep: with train.compile they say so and run the model eagerly."""
    from tests.helpers import batches_for, tiny_config
    for mtl in ("pcgrad", "nash"):
        cfg = tiny_config({"ant": {"mtl": mtl}}, train={"compile": True})
        with pytest.warns(UserWarning, match=f"train.compile: ANT-{mtl}"):
            state = build_state(cfg, LocalRuntime(), batches_for(cfg))
        assert state.model is state.raw_model


@pytest.mark.parametrize("task, mode", [
    ([0, 0, 1, 1, 2, 2], "view"),              # ANT's stratified layout: a free view
    ([2, 0, 1, 0, 2, 1], "gather"),            # equal groups, shuffled
    ([0, 1, 1, 1, 2, 0], "padded"),            # unequal groups (i.i.d. sampling)
    ([0, 0, 2, 2, 2, 2], "padded"),            # an interval with no sample
], ids=["view", "gather", "padded", "empty-interval"])
def test_interval_groups_hold_each_intervals_rows(task, mode):
    """Each grouping puts exactly interval k's samples in row k (zero rows as padding), so the
    per-layer batched GEMM gives Σ_{n∈k} δ_nᵀ a_n whichever layout the batch has."""
    from trainers.methods.grouped_grads import IntervalGroups
    task = torch.tensor(task)
    groups = IntervalGroups(task, 3)
    assert groups.mode == mode
    a, d = torch.randn(6, 5, 4), torch.randn(6, 5, 3)                        # [N, L, C], [N, L, D]
    ga, gd = groups.gather(a), groups.gather(d)
    assert ga.shape[:2] == (3, groups.m)
    got = torch.bmm(gd.reshape(3, -1, 3).transpose(1, 2), ga.reshape(3, -1, 4))   # [K, D, C]
    for k in range(3):
        rows = task == k
        want = torch.einsum("nld,nlc->dc", d[rows], a[rows])
        torch.testing.assert_close(got[k], want)
