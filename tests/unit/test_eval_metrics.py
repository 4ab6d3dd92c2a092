"""Unit tests for trainers/eval: Fréchet distance, improved precision/recall, Inception Score,
the hand-written Inception-v3 loader and the small digits feature network."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from trainers.errors import CheckpointError, ConfigError, DataError
from trainers.eval import feature_net as fn
from trainers.eval.feature_net import (
    extract_features,
    feature_net_cache_path,
    load_or_train_feature_net,
    train_feature_net,
)
from trainers.eval.frechet import feature_stats, frechet_distance
from trainers.eval.inception import build_inception, load_inception
from trainers.eval.inception_score import inception_score
from trainers.eval.precision_recall import precision_recall


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_identical_gaussians_is_zero() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = feature_stats(rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)))
    assert mu.dtype == np.float64 and sigma.shape == (16, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_shifted_means_identity_covariance() -> None:
    mu1, mu2 = np.zeros(5), np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(mu1, np.eye(5), mu2, np.eye(5)) == pytest.approx(
        float(mu2 @ mu2), rel=1e-10)


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + ((mu1 - mu2) ** 2).sum())
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_symmetric_and_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(2)
    s1, s2 = _random_cov(rng, 12), _random_cov(rng, 12)
    m1, m2 = rng.standard_normal(12), rng.standard_normal(12)
    d12, d21 = frechet_distance(m1, s1, m2, s2), frechet_distance(m2, s2, m1, s1)
    assert d12 == pytest.approx(d21, rel=1e-9)
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float((m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * covmean))
    assert d12 == pytest.approx(ref, rel=1e-7)


def test_frechet_near_singular_is_finite() -> None:
    rng = np.random.default_rng(3)
    # Fewer samples than dimensions: rank-deficient covariances; plus an all-zero covariance.
    mu1, s1 = feature_stats(rng.standard_normal((5, 32)))
    mu2, s2 = feature_stats(rng.standard_normal((6, 32)) + 1.0)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0
    zero = frechet_distance(np.zeros(4), np.zeros((4, 4)), np.ones(4), np.eye(4))
    assert zero == pytest.approx(4.0 + 4.0)


def test_frechet_validation_errors() -> None:
    with pytest.raises(DataError, match="features"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(DataError, match="mu1/mu2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(DataError, match="mu1/sigma1"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_same_distribution_near_one() -> None:
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((1500, 4)), rng.standard_normal((1500, 4))
    pr = precision_recall(real, fake, k=3, batch=256)
    assert pr["precision"] > 0.85 and pr["recall"] > 0.85


def test_precision_recall_disjoint_clouds_zero() -> None:
    rng = np.random.default_rng(5)
    real = rng.standard_normal((500, 4))
    pr = precision_recall(real, rng.standard_normal((400, 4)) + 100.0)
    assert pr == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_tight_subset() -> None:
    rng = np.random.default_rng(6)
    real = rng.standard_normal((3000, 2))
    fake = real[np.linalg.norm(real, axis=1) < 0.4]
    pr = precision_recall(real, fake, k=3, batch=500)
    assert pr["precision"] > 0.95
    assert pr["recall"] < 0.2


def test_precision_recall_validation() -> None:
    with pytest.raises(ConfigError, match="k"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(DataError, match="dimensions"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


# ---------------------------------------------------------------- Inception Score


def test_inception_score_uniform_is_one() -> None:
    mean, std = inception_score(np.zeros((100, 10)), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_diverse_is_num_classes() -> None:
    classes = 10
    labels = np.arange(classes * 10 * 5) % classes
    logits = 50.0 * np.eye(classes)[labels]
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-6) and std < 1e-6
    with pytest.raises(ConfigError, match="splits"):
        inception_score(logits[:5], splits=10)


# ---------------------------------------------------------------- Inception-v3


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    net = build_inception()
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_inception_round_trip(inception_file) -> None:
    net, path = inception_file
    loaded = load_inception(str(path))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        pool_a, logits_a = net(images)
        pool_b, logits_b = loaded(images)
    assert pool_a.shape == (2, 2048) and logits_a.shape == (2, 1008)
    assert torch.equal(pool_a, pool_b) and torch.equal(logits_a, logits_b)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_inception_missing_file(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(DataError, match="Inception weights not found") as info:
        load_inception(str(missing))
    assert str(missing) in str(info.value) and "--inception" in str(info.value)


def test_inception_wrong_state_dict(tmp_path, inception_file) -> None:
    net, _ = inception_file
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3), "fc.weight": torch.zeros(1008, 2048)}, bad)
    with pytest.raises(CheckpointError, match="missing") as info:
        load_inception(bad)
    assert "conv.weight" in str(info.value)
    state = net.state_dict()
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    wrong_shape = tmp_path / "shape.pth"
    torch.save(state, wrong_shape)
    with pytest.raises(CheckpointError, match="shape"):
        load_inception(wrong_shape)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_inception(garbage)


# ---------------------------------------------------------------- digits feature network


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    images = torch.tensor(data.images / 16.0 * 2.0 - 1.0, dtype=torch.float32)[:, None]
    return images, torch.tensor(data.target, dtype=torch.long)


@pytest.fixture(scope="module")
def digits_net(digits) -> fn.FeatureNet:
    images, labels = digits
    return train_feature_net(images[:1200], labels[:1200], 10, seed=0)


def test_feature_net_deterministic_per_seed(digits) -> None:
    images, labels = digits[0][:400], digits[1][:400]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = train_feature_net(images, labels, 10, seed=7, epochs=2)
    assert torch.equal(torch.rand(3), expected_next), "training must not touch the global RNG"
    b = train_feature_net(images, labels, 10, seed=7, epochs=2)
    c = train_feature_net(images, labels, 10, seed=8, epochs=2)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_feature_net_shapes_and_state_dict(digits, digits_net) -> None:
    images = digits[0][1200:1210]
    feats, logits = digits_net(images)
    assert feats.shape == (10, fn.FEATURE_DIM) and logits.shape == (10, 10)
    clone = fn.FeatureNet(**digits_net.config())
    clone.load_state_dict(digits_net.state_dict())
    assert torch.equal(clone(images)[0], feats)
    big = fn.FeatureNet(3, 4)(torch.zeros(2, 3, 20, 13))
    assert big[0].shape == (2, fn.FEATURE_DIM)
    with pytest.raises(DataError, match="images"):
        digits_net(torch.zeros(2, 1, 4, 4))


def test_feature_net_frechet_separates_real_from_noise(digits, digits_net) -> None:
    held_out = digits[0][1200:]
    half = held_out.shape[0] // 2
    real_a, _ = extract_features(digits_net, held_out[:half])
    real_b, logits_b = extract_features(digits_net, held_out[half:])
    assert (logits_b.argmax(1) == digits[1][1200 + half:].numpy()).mean() > 0.8
    noise = torch.randn(half, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    noise_f, _ = extract_features(digits_net, noise)
    fd_real = frechet_distance(*feature_stats(real_a), *feature_stats(real_b))
    fd_noise = frechet_distance(*feature_stats(real_a), *feature_stats(noise_f))
    assert fd_real < fd_noise / 5


def test_feature_net_cache_round_trip(tmp_path, digits, monkeypatch) -> None:
    images, labels = digits[0][:300], digits[1][:300]
    first = load_or_train_feature_net(tmp_path, "digits", images, labels, 10, seed=3)
    path = feature_net_cache_path(tmp_path, "digits", 3)
    assert path == tmp_path / "digits-seed3.pt" and path.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("cache hit expected, but the network was retrained")

    monkeypatch.setattr(fn, "train_feature_net", no_training)
    second = load_or_train_feature_net(tmp_path, "digits", images, labels, 10, seed=3)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    # Different data: the fingerprint changes, so the cache is not reused.
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_feature_net(tmp_path, "digits", images[:200], labels[:200], 10, seed=3)
    path.write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="delete it"):
        load_or_train_feature_net(tmp_path, "digits", images, labels, 10, seed=3)
    with pytest.raises(ConfigError, match="name"):
        feature_net_cache_path(tmp_path, "../x", 0)


def test_eval_imports_only_torch_numpy_stdlib() -> None:
    code = (
        "import sys\n"
        "import trainers.eval.frechet, trainers.eval.precision_recall\n"
        "import trainers.eval.inception_score, trainers.eval.inception\n"
        "import trainers.eval.feature_net\n"
        "bad = [m for m in ('scipy', 'sklearn', 'torchvision', 'PIL', 'ray', 'mlflow')\n"
        "       if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
