"""A small CNN feature extractor for FID-style metrics on the built-in tiny datasets.

Inception-v3 features (Szegedy et al. 2016) are meaningless on 8×8 ``digits`` or small
``shapes`` images, so for those datasets the Fréchet distance (Heusel et al. 2017) and improved
precision/recall (Kynkäänniemi et al. 2019) are computed in the penultimate layer of a small
classifier trained on the real data, the same substitution used for MNIST-scale FID in the
literature. Its value is only comparable between runs that use the same feature network, so the
training recipe is FIXED (constants below), training is deterministic on a CPU for a given seed
(a local ``torch.Generator`` drives initialisation and shuffling; the global RNG is untouched),
and the trained weights are cached under a name and seed together with a fingerprint of the
data and recipe.

Recipe: Adam (lr ``LEARNING_RATE``), ``EPOCHS`` epochs of ``BATCH_SIZE`` shuffled samples,
cross-entropy, no augmentation, He-uniform init with zero biases.
Architecture: conv3×3(C→32)-ReLU, conv3×3(32→32)-ReLU, avg-pool 2, conv3×3(32→64)-ReLU,
adaptive avg-pool 2×2, linear(256→64) = features, ReLU, linear(64→num_classes) = logits.
"""
from __future__ import annotations

import hashlib
import math
import os
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.errors import CheckpointError, ConfigError, DataError

__all__ = [
    "FeatureNet", "train_feature_net", "extract_features", "feature_net_fingerprint",
    "feature_net_cache_path", "load_or_train_feature_net",
    "LEARNING_RATE", "EPOCHS", "BATCH_SIZE", "FEATURE_DIM", "WIDTH",
]

LEARNING_RATE = 2e-3
EPOCHS = 15
BATCH_SIZE = 64
FEATURE_DIM = 64
WIDTH = 32
MIN_SIZE = 8
_RECIPE_VERSION = "feature-net-v1"


class FeatureNet(nn.Module):
    """Small CNN: ``forward(x[N, C, H, W] in [-1, 1]) -> (features[N, D], logits[N, K])``."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = FEATURE_DIM,
                 width: int = WIDTH) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("feature_dim", feature_dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.feature_dim, self.width = feature_dim, width
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.embed = nn.Linear(2 * width * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict[str, int]:
        """Constructor arguments, enough to rebuild the network before loading a state dict."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "feature_dim": self.feature_dim, "width": self.width}

    def reset_parameters(self, generator: torch.Generator) -> None:
        """He-uniform weights and zero biases drawn from ``generator`` only."""
        with torch.no_grad():
            for module in (self.conv1, self.conv2, self.conv3, self.embed, self.head):
                fan_in = module.weight[0].numel()
                bound = math.sqrt(6.0 / fan_in)
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < MIN_SIZE:
            raise DataError(
                f"images: expected [N, {self.in_channels}, H, W] with H, W >= {MIN_SIZE}, "
                f"got shape {tuple(x.shape)}"
            )
        h = F.relu(self.conv1(x))
        h = F.avg_pool2d(F.relu(self.conv2(h)), 2)
        h = F.adaptive_avg_pool2d(F.relu(self.conv3(h)), 2)
        features = self.embed(torch.flatten(h, 1))
        return features, self.head(F.relu(features))


def _check_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise DataError("images: expected a float tensor [N, C, H, W] in [-1, 1]")
    if min(images.shape[-2:]) < MIN_SIZE:
        raise DataError(f"images: height and width must be >= {MIN_SIZE}, got "
                        f"{tuple(images.shape[-2:])}; upsample the dataset")
    if not torch.isfinite(images).all():
        raise DataError("images: contain NaN or infinite values")
    if (not isinstance(labels, torch.Tensor) or labels.dtype != torch.long
            or labels.shape != (images.shape[0],)):
        raise DataError(f"labels: expected a LongTensor of shape [{images.shape[0]}] "
                        "(one class index per image)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes: must be an integer >= 2, got {num_classes!r}")
    if images.shape[0] and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels: values must lie in [0, {num_classes}), got "
                        f"[{int(labels.min())}, {int(labels.max())}]")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")


def train_feature_net(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
) -> FeatureNet:
    """Train a :class:`FeatureNet` with the fixed recipe; deterministic on CPU per ``seed``.

    Returns the network in eval mode with gradients disabled.
    """
    _check_data(images, labels, num_classes)
    _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    if images.shape[0] < 2:
        raise DataError(f"images: need at least 2 training images, got {images.shape[0]}")
    generator = torch.Generator().manual_seed(int(seed))
    x = images.detach().to(device="cpu", dtype=torch.float32).contiguous()
    y = labels.detach().to("cpu")
    with torch.random.fork_rng(devices=[]):  # the default init must not consume global RNG
        net = FeatureNet(int(x.shape[1]), num_classes)
    net.reset_parameters(generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            _, logits = net(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.requires_grad_(False)
    return net.eval()


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor,
                     batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` (FeatureNet or InceptionFeatures) in batches; float64 features, logits."""
    _check_positive("batch_size", batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        f, lg = model(images[start:start + batch_size].to(device=device, dtype=torch.float32))
        feats.append(f.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
    model.train(was_training)
    if not feats:
        raise DataError("images: no images to extract features from")
    return np.concatenate(feats), np.concatenate(logits)


def feature_net_fingerprint(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            seed: int = 0, epochs: int = EPOCHS,
                            batch_size: int = BATCH_SIZE) -> str:
    """SHA-256 over recipe, architecture, seed and the exact training data (hex string)."""
    digest = hashlib.sha256()
    recipe = (f"{_RECIPE_VERSION}|lr={LEARNING_RATE}|epochs={epochs}|batch={batch_size}|"
              f"dim={FEATURE_DIM}|width={WIDTH}|classes={num_classes}|seed={seed}|"
              f"shape={tuple(images.shape)}")
    digest.update(recipe.encode())
    x = images.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    digest.update(x.tobytes())
    digest.update(labels.detach().to(device="cpu", dtype=torch.long).contiguous().numpy()
                  .tobytes())
    return digest.hexdigest()


def feature_net_cache_path(cache_dir: pathlib.Path, name: str, seed: int = 0) -> pathlib.Path:
    """``<cache_dir>/<name>-seed<seed>.pt``; ``name`` must be a plain file-name stem."""
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name.startswith("."):
        raise ConfigError(f"name: {name!r} is not a plain file-name stem; use e.g. 'digits'")
    return pathlib.Path(cache_dir) / f"{name}-seed{int(seed)}.pt"


def _load_cached(path: pathlib.Path, fingerprint: str) -> FeatureNet | None:
    """The cached network, or None when the cache was made from other data or recipe."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("fingerprint") != fingerprint:
            return None
        net = FeatureNet(**{k: int(payload[k]) for k in
                            ("in_channels", "num_classes", "feature_dim", "width")})
        net.load_state_dict(payload["state_dict"])
    except Exception as err:  # unpickling, key and shape errors share no base class
        raise CheckpointError(
            f"feature-net cache {path} is unreadable ({type(err).__name__}); delete it to retrain"
        ) from err
    net.requires_grad_(False)
    return net.eval()


def load_or_train_feature_net(cache_dir: pathlib.Path, name: str, images: torch.Tensor,
                              labels: torch.Tensor, num_classes: int,
                              seed: int = 0) -> FeatureNet:
    """Load ``<cache_dir>/<name>-seed<seed>.pt`` if it was trained on these data with this
    recipe, else train with :func:`train_feature_net` and (atomically) write the cache."""
    path = feature_net_cache_path(cache_dir, name, seed)
    _check_data(images, labels, num_classes)
    fingerprint = feature_net_fingerprint(images, labels, num_classes, seed)
    if path.is_file():
        cached = _load_cached(path, fingerprint)
        if cached is not None:
            return cached
    net = train_feature_net(images, labels, num_classes, seed=seed)
    payload = {"fingerprint": fingerprint, **net.config(),
               "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return net
