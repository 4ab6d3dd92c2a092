"""Unit tests for the evaluation pieces around the metric math: uint8 quantisation, cached
reference statistics, extractor-named metrics, the built-in feature-net extractor and its cache,
Inception loading through the user's path, seed-block sampling and the evaluation schedule."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.jobs.evaluation import eval_due, is_eval_metric
from orchestrator.jobs.sampling import SampleSpec, sample_blocks, sample_images
from tests.helpers import randomize_, tiny_config
from trainers.build import build_all
from trainers.data import ArrayDataset, make_shapes
from trainers.errors import CheckpointError, ConfigError, DataError
from trainers.eval import suite
from trainers.eval.inception import build_inception
from trainers.eval.reference import (cache_root, from_uint8, images_fingerprint,
                                     load_or_compute_reference, quantize, reference_key, to_uint8)
from trainers.eval.suite import Extractor, builtin_extractor, inception_extractor, metric_keys, score_images


class Flatten(nn.Module):
    """A stand-in extractor: pixels are the features, a fixed projection gives 3 'class' logits."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 3, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linspace(-1, 1, 192).reshape(3, 64))

    def forward(self, x: torch.Tensor):
        f = x.flatten(1)
        return f, self.proj(f)


def _blobs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 0.6 - 0.8).clamp(-1, 1)


def test_uint8_round_trip_and_cache_root(tmp_path, monkeypatch) -> None:
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = to_uint8(x)
    assert pixels.shape == (5, 4, 4, 3) and pixels.dtype == np.uint8
    assert torch.equal(quantize(quantize(x)), quantize(x))
    assert torch.allclose(from_uint8(pixels), x, atol=1 / 127.5)
    with pytest.raises(DataError, match="uint8"):
        from_uint8(pixels.astype(np.float32))
    monkeypatch.setenv("DENOISELAB_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and cache_root("/x") == type(tmp_path)("/x")


def test_reference_stats_computed_once_and_keyed_by_content(tmp_path) -> None:
    feats = np.random.default_rng(0).standard_normal((300, 4))
    calls = []

    def compute():
        calls.append(1)
        return feats

    key = reference_key("toy", "weights-a", images_fingerprint(np.zeros((2, 2), np.uint8)))
    first = load_or_compute_reference(tmp_path, key, compute)
    second = load_or_compute_reference(tmp_path, key, compute)
    assert len(calls) == 1 and first.count == second.count == 300
    assert np.array_equal(first.mu, second.mu) and np.array_equal(first.features, second.features)
    assert np.allclose(first.mu, feats.mean(0)) and first.subset(50).shape == (50, 4)
    assert key != reference_key("toy", "weights-b", images_fingerprint(np.zeros((2, 2), np.uint8)))
    assert key != reference_key("toy", "weights-a", images_fingerprint(np.ones((2, 2), np.uint8)))
    (tmp_path / "reference" / f"{key}.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="delete the file"):
        load_or_compute_reference(tmp_path, key, compute)


def test_scores_are_named_after_the_extractor(tmp_path) -> None:
    real = ArrayDataset(_blobs(400, 0), torch.zeros(400, dtype=torch.long), 1)
    toy = Extractor("toy", "toy", Flatten(), "toy-weights")
    ref = suite.reference_for(toy, real, tmp_path)
    same = score_images(toy, ref, real.images[:200])
    other = score_images(toy, ref, _blobs(200, 1))
    noise = score_images(toy, ref, torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    assert set(same) == {"fd_toy", "precision_toy", "recall_toy"} == set(metric_keys("toy"))
    assert same["precision_toy"] > 0.8 and same["recall_toy"] > 0.8 and other["fd_toy"] < noise["fd_toy"] / 5
    assert noise["precision_toy"] < 0.1
    fake_inception = Extractor("inception", "inception", Flatten(), "fid-weights")
    named = score_images(fake_inception, suite.reference_for(fake_inception, real, tmp_path), _blobs(200, 1))
    assert set(named) == {"fid", "is", "is_std", "precision_inception", "recall_inception"}
    assert 1.0 <= named["is"] <= 3.0
    assert all(is_eval_metric(k) for k in [*named, *other]) and not is_eval_metric("interval/loss_1")
    with pytest.raises(DataError, match="at least 2"):
        score_images(toy, ref, _blobs(1, 3))


def test_builtin_extractor_trains_once_then_hits_the_cache(tmp_path, monkeypatch) -> None:
    shapes = make_shapes(96, 12, 3, seed=0)
    ex = builtin_extractor("shapes", shapes, tmp_path)
    assert ex.label == "shapes" and ex.name == "shapes-12px-3c-96n-s0"
    cached = tmp_path / "feature_nets" / "shapes-12px-3c-96n-s0-seed0.pt"
    stamp = os.stat(cached).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached feature net should have been used")

    monkeypatch.setattr("trainers.eval.feature_net.train_feature_net", no_training)
    again = builtin_extractor("shapes", shapes, tmp_path)
    assert again.fingerprint == ex.fingerprint and os.stat(cached).st_mtime_ns == stamp
    metrics = score_images(ex, suite.reference_for(ex, shapes, tmp_path), shapes.images[:40])
    assert set(metrics) == {"fd_shapes", "precision_shapes", "recall_shapes"}
    with pytest.raises(ConfigError, match="--inception"):
        builtin_extractor("parquet", shapes, tmp_path)
    with pytest.raises(DataError, match="labels"):
        builtin_extractor("shapes", ArrayDataset(shapes.images, None, 0), tmp_path)
    with pytest.raises(ConfigError, match="DENOISELAB_INCEPTION"):
        suite.check_extractor_available("parquet", None)


def test_inception_extractor_from_a_user_file(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "pt_inception.pth"
    torch.save(build_inception().state_dict(), path)
    ex = inception_extractor(path)
    assert ex.is_inception and metric_keys(ex.label)[0] == "fid" and len(ex.fingerprint) == 64
    with pytest.raises(DataError, match="--inception"):
        inception_extractor(tmp_path / "missing.pth")


def _state() -> dict:
    cfg = tiny_config(data={"name": "digits"})
    model, _, _, intervals, spec = build_all(cfg, image_size=8, channels=1, num_classes=10)
    weights = randomize_(model, seed=1).state_dict()
    return {"config": cfg.to_dict(), "model_spec": spec, "intervals": intervals.to_list(), "ema": weights,
            "model": weights, "step": 7}


def test_sample_i_depends_only_on_seed_and_i() -> None:
    state = _state()
    spec = SampleSpec(n=10, steps=2, block=4)
    whole = sample_images(state, spec, local=True)
    assert whole.indices.tolist() == list(range(10)) and whole.labels.tolist() == [i % 10 for i in range(10)]
    parts = [sample_blocks(state, spec, [2]), sample_blocks(state, spec, [0, 1])]        # another split
    split = np.concatenate([parts[1]["images"], parts[0]["images"]])
    assert np.array_equal(split, whole.images)
    shorter = sample_images(state, SampleSpec(n=6, steps=2, block=4), local=True)      # another N
    assert np.array_equal(shorter.images, whole.images[:6])
    reseeded = sample_images(state, SampleSpec(n=6, seed=1, steps=2, block=4), local=True)
    assert not np.array_equal(reseeded.images, shorter.images)
    assert whole.meta["checkpoint_step"] == 7 and whole.meta["weights"] == "ema"
    with pytest.raises(ConfigError, match="--n"):
        SampleSpec(n=0)


@pytest.mark.parametrize("every, ckpt, total, due", [
    (0, 10, 30, [30]),                          # only at the end
    (10, 10, 30, [10, 20, 30]),
    (25, 10, 60, [30, 50, 60]),                 # every need not divide into checkpoints
    (20, 10, 35, [20, 35]),                     # final step off the checkpoint grid
])
def test_eval_schedule(every, ckpt, total, due) -> None:
    steps = sorted({*range(ckpt, total + 1, ckpt), total})
    assert [s for s in steps if eval_due(s, every, ckpt, total)] == due
