"""Feature extractors and the metrics computed with them, named after the extractor.

* Built-in datasets (``digits``, ``shapes``): the small classifier of ``feature_net.py``, trained
  by denoiselab with a fixed recipe and seed and cached. Metrics: ``fd_<set>`` (Fréchet distance,
  Heusel et al. 2017 Eq. 6, in THAT network's 64-d feature space: not FID and not comparable
  with any published FID), ``precision_<set>`` / ``recall_<set>`` (Kynkäänniemi et al. 2019).
* Inception-v3 with user-supplied weights (``inception.py``): ``fid``, ``is`` / ``is_std``
  (Salimans et al. 2016, Sec. 4, from the 1008/1000-way logits), ``precision_inception`` /
  ``recall_inception``.

Precision/recall use equally many real and generated points (the first ``n`` rows of the
cached, shuffled real features), since the k-NN radii depend on the set size.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from trainers.data import ArrayDataset
from trainers.errors import ConfigError, DataError
from trainers.eval.feature_net import extract_features, load_or_train_feature_net
from trainers.eval.frechet import feature_stats, frechet_distance
from trainers.eval.inception import load_inception
from trainers.eval.inception_score import inception_score
from trainers.eval.precision_recall import precision_recall
from trainers.eval.reference import (ReferenceStats, cache_lock, images_fingerprint, load_or_compute_reference,
                                     quantize, reference_key, to_uint8)

__all__ = ["Extractor", "builtin_extractor", "inception_extractor", "reference_for", "score_images",
           "BUILTIN_SETS", "FEATURE_NET_SEED", "PR_K", "metric_keys", "check_extractor_available"]

BUILTIN_SETS = ("digits", "shapes")
FEATURE_NET_SEED = 0
PR_K = 3                           # the paper's neighbourhood size


@dataclass(frozen=True)
class Extractor:
    name: str                      # "digits", "shapes-16px-4c-4096n-s0", "inception"
    label: str                     # metric suffix: "digits", "shapes", "inception"
    model: nn.Module
    fingerprint: str               # identifies the weights (and, for feature nets, their training data)
    batch_size: int = 512

    @property
    def is_inception(self) -> bool:
        return self.label == "inception"

    def features(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return extract_features(self.model, images, batch_size=self.batch_size)


def metric_keys(label: str) -> tuple[str, ...]:
    """The metric names an extractor produces (for logs and review)."""
    if label == "inception":
        return ("fid", "is", "is_std", "precision_inception", "recall_inception")
    return (f"fd_{label}", f"precision_{label}", f"recall_{label}")


def _builtin_name(data_name: str, data: ArrayDataset, data_seed: int) -> str:
    if data_name == "digits":
        return "digits"
    return f"shapes-{data.image_size}px-{data.num_classes}c-{len(data)}n-s{data_seed}"


def builtin_extractor(data_name: str, data: ArrayDataset, cache_dir: Path, data_seed: int = 0,
                      device: str | torch.device = "cpu") -> Extractor:
    """The cached feature net for a built-in set (trained on its quantised images and labels)."""
    if data_name not in BUILTIN_SETS:
        raise ConfigError(f"data.name: {data_name!r} has no built-in feature network (only "
                          f"{', '.join(BUILTIN_SETS)}); pass Inception weights with --inception PATH")
    if data.labels is None or data.num_classes < 2:
        raise DataError(f"data: the {data_name} feature network needs class labels and >= 2 classes "
                        f"(got {data.num_classes}); use data.num_classes >= 2")
    images = quantize(data.images)
    name = _builtin_name(data_name, data, data_seed)
    nets = Path(cache_dir) / "feature_nets"
    with cache_lock(nets / name):
        net = load_or_train_feature_net(nets, name, images, data.labels, data.num_classes, seed=FEATURE_NET_SEED)
    digest = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    return Extractor(name, data_name, net.to(device), digest.hexdigest())


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inception_extractor(path: str | os.PathLike, device: str | torch.device = "cpu") -> Extractor:
    """User-supplied Inception-v3 weights (never downloaded); clear error when absent."""
    model = load_inception(path, device=device)
    return Extractor("inception", "inception", model, _file_digest(os.fspath(path)), batch_size=50)


def reference_for(extractor: Extractor, data: ArrayDataset, cache_dir: Path) -> ReferenceStats:
    """Cached real-data statistics of ``data`` (quantised as stored) in ``extractor``'s space."""
    pixels = to_uint8(data.images)
    key = reference_key(extractor.name, extractor.fingerprint, images_fingerprint(pixels))
    return load_or_compute_reference(Path(cache_dir), key, lambda: extractor.features(quantize(data.images))[0])


def score_images(extractor: Extractor, reference: ReferenceStats, images: torch.Tensor,
                 k: int = PR_K) -> dict[str, float]:
    """Metrics of generated ``images`` ([N, C, H, W] in [−1, 1], quantised here) against ``reference``."""
    if images.shape[0] < 2:
        raise DataError(f"samples: need at least 2 generated images for a covariance, got {images.shape[0]}")
    feats, logits = extractor.features(quantize(images))
    mu, sigma = feature_stats(feats)
    fd = frechet_distance(reference.mu, reference.sigma, mu, sigma)
    label = extractor.label
    out: dict[str, float] = {"fid" if extractor.is_inception else f"fd_{label}": fd}
    real = reference.subset(len(feats))
    if min(len(real), len(feats)) > k:
        pr = precision_recall(real, feats[:len(real)], k=k)
        out.update({f"precision_{label}": pr["precision"], f"recall_{label}": pr["recall"]})
    if extractor.is_inception:
        splits = 10 if len(logits) >= 10 else 1
        out["is"], out["is_std"] = inception_score(logits, splits=splits)
    return out


def check_extractor_available(data_name: str, inception: Optional[str]) -> None:
    """Fail fast when no extractor applies (a dataset without a feature net and no weights)."""
    if data_name not in BUILTIN_SETS and not inception:
        raise ConfigError(f"eval: data.name={data_name} has no built-in feature network; pass Inception "
                          f"weights with --inception PATH (or set DENOISELAB_INCEPTION=PATH), or set eval.n=0")
