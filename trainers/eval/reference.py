"""Reference statistics of the real data, computed once per (data, extractor) and cached.

The Fréchet distance (Heusel et al. 2017, Eq. 6) compares the Gaussian (μ_r, Σ_r) fitted to
real features with the one fitted to generated features; improved precision/recall
(Kynkäänniemi et al. 2019, Eq. 1-2) needs the real feature vectors themselves. Both depend only
on the real data and the extractor, so they are computed once and stored as
``<cache>/reference/<key>.npz`` (``mu``, ``sigma``, ``features``, ``count``), where ``key`` is a
digest of the extractor's fingerprint and of the exact uint8 pixels of the data. A stale or
foreign file can therefore never be used: other data or other weights give another key.

Images are compared as they are stored: both real and generated images go through the same
uint8 quantisation (:func:`quantize`) before feature extraction, so an in-training evaluation,
``denoiselab evaluate`` and an evaluation of a saved ``.npz`` see identical pixels.

Cache directory: ``$DENOISELAB_CACHE`` if set, else ``~/.cache/denoiselab``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from trainers.errors import CheckpointError, DataError
from trainers.eval.frechet import feature_stats

__all__ = ["cache_root", "quantize", "to_uint8", "from_uint8", "images_fingerprint", "ReferenceStats",
           "load_or_compute_reference", "reference_key", "cache_lock", "MAX_PR_REFERENCE"]

MAX_PR_REFERENCE = 10_000          # real feature rows kept for precision/recall
_FORMAT = 1


def cache_root(explicit: Optional[str | os.PathLike] = None) -> Path:
    """``explicit`` or ``$DENOISELAB_CACHE`` or ``~/.cache/denoiselab``."""
    root = explicit or os.environ.get("DENOISELAB_CACHE") or Path.home() / ".cache" / "denoiselab"
    return Path(root).expanduser()


@contextlib.contextmanager
def cache_lock(path: Path):
    """Exclusive lock on ``<path>.lock`` (POSIX ``flock``): concurrent evaluations on one node (two
    checkpoints, parallel trials) compute a cache entry once instead of racing to write it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):      # no flock (Windows, some network filesystems): unlocked
            pass
        yield


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] -> uint8 [N, H, W, C] (the stored form, as ``data_io``)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [−1, 1]."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise DataError(f"images: expected uint8 [N, H, W, C], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round-trip through uint8: what a saved image looks like when read back."""
    return from_uint8(to_uint8(images))


def images_fingerprint(pixels: np.ndarray) -> str:
    """SHA-256 over shape and uint8 pixels."""
    digest = hashlib.sha256(str(tuple(pixels.shape)).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def reference_key(extractor_name: str, extractor_fingerprint: str, data_fingerprint: str) -> str:
    joint = hashlib.sha256(f"{_FORMAT}|{extractor_fingerprint}|{data_fingerprint}".encode()).hexdigest()
    return f"{extractor_name}-{joint[:20]}"


@dataclass(frozen=True)
class ReferenceStats:
    """Real-data statistics in one extractor's feature space."""
    mu: np.ndarray                 # [D]
    sigma: np.ndarray              # [D, D]
    features: np.ndarray           # [M, D], M <= MAX_PR_REFERENCE, in a fixed shuffled order
    count: int                     # real images the Gaussian was fitted on

    def subset(self, n: int) -> np.ndarray:
        """The first ``n`` kept real feature rows (precision/recall on equal-sized sets)."""
        return self.features[:max(1, min(n, len(self.features)))]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, features=self.features, count=np.int64(self.count),
                 format=np.int64(_FORMAT))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ReferenceStats":
        try:
            with np.load(path) as data:
                return cls(data["mu"], data["sigma"], data["features"], int(data["count"]))
        except (OSError, KeyError, ValueError) as err:
            raise CheckpointError(f"reference statistics {path} are unreadable ({type(err).__name__}); "
                                  f"delete the file to recompute them") from None

    @classmethod
    def from_features(cls, features: np.ndarray, seed: int = 0) -> "ReferenceStats":
        mu, sigma = feature_stats(features)
        order = np.random.default_rng(seed).permutation(len(features))[:MAX_PR_REFERENCE]
        return cls(mu, sigma, np.ascontiguousarray(features[order]), int(len(features)))


def load_or_compute_reference(cache_dir: Path, key: str,
                              compute_features: Callable[[], np.ndarray]) -> ReferenceStats:
    """``<cache_dir>/reference/<key>.npz`` if present, else compute, write atomically, return."""
    path = Path(cache_dir) / "reference" / f"{key}.npz"
    with cache_lock(path):
        if path.is_file():
            return ReferenceStats.load(path)
        stats = ReferenceStats.from_features(np.asarray(compute_features(), dtype=np.float64))
        stats.save(path)
    return stats
