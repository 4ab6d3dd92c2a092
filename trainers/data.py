"""Datasets and batch sources for the training loop (torch + numpy only).

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes),
  read with numpy straight from the file scikit-learn ships (no sklearn import here).
* ``shapes``: procedurally drawn coloured shapes at any resolution, deterministic from a seed.
* in-memory arrays (from Parquet shards read by the orchestrator, or ``.npz``).

A batch source is a pure function of the step (:class:`StepBatches`), so resuming at step k
continues at exactly the data position of an uninterrupted run, with no iterator state to save.
Each rank takes a disjoint slice of the same global batch.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from trainers.errors import ConfigError, DataError

__all__ = ["ArrayDataset", "load_digits", "make_shapes", "StepBatches", "BatchSource",
           "builtin_dataset", "builtin_geometry", "training_batches", "SHAPE_NAMES"]

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")


@dataclass
class ArrayDataset:
    images: torch.Tensor                 # [N, C, H, W] float32 in [-1, 1]
    labels: Optional[torch.Tensor]       # [N] int64, or None (unconditional)
    num_classes: int                     # 0 when unlabelled

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"dataset images: expected [N, C, H, W], got shape {tuple(self.images.shape)}")
        if self.images.shape[2] != self.images.shape[3]:
            raise DataError(f"dataset images: expected square images, got {tuple(self.images.shape[2:])}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError("dataset labels: one label per image is required")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def split(self, fraction: float, seed: int = 0) -> tuple["ArrayDataset", "ArrayDataset"]:
        """Deterministic (train, held-out) split."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        k = int(round(len(self) * (1 - fraction)))
        a, b = perm[:k], perm[k:]
        lab = self.labels
        return (ArrayDataset(self.images[a], None if lab is None else lab[a], self.num_classes),
                ArrayDataset(self.images[b], None if lab is None else lab[b], self.num_classes))


def _digits_file() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name=digits: scikit-learn is not installed; `pip install scikit-learn` "
                        "(it ships the digits file) or use data.name=shapes")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.exists():
        raise DataError(f"digits data file not found at {path}; reinstall scikit-learn")
    return path


def load_digits() -> ArrayDataset:
    """The 8x8 digits (values 0..16) scaled to [−1, 1], shape [1797, 1, 8, 8], 10 classes."""
    with gzip.open(_digits_file(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :64].reshape(-1, 1, 8, 8) / 16.0 * 2.0 - 1.0)
    labels = torch.from_numpy(table[:, 64].astype(np.int64))
    return ArrayDataset(images.contiguous(), labels, 10)


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == "square":
        return (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8)
    if kind == "triangle":
        return (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == "cross":
        w = max(r * 0.3, 0.6)
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if kind == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (r * 0.55) ** 2)
    return np.abs(dx) + np.abs(dy) <= r                                  # diamond


def make_shapes(num_samples: int, image_size: int, num_classes: int, seed: int) -> ArrayDataset:
    """Coloured shapes on a dark background; class = shape kind. RGB, [−1, 1]."""
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ConfigError(f"data.num_classes: shapes has 1..{len(SHAPE_NAMES)} classes, got {num_classes}")
    if num_samples < 1:
        raise ConfigError("data.num_samples: must be >= 1")
    rng = np.random.default_rng(seed)
    images = np.full((num_samples, 3, image_size, image_size), -0.8, dtype=np.float32)
    labels = rng.integers(0, num_classes, size=num_samples)
    for i in range(num_samples):
        r = rng.uniform(0.22, 0.38) * image_size
        cx, cy = rng.uniform(r, image_size - r, size=2)
        color = rng.uniform(-0.2, 1.0, size=3).astype(np.float32)
        mask = _shape_mask(SHAPE_NAMES[labels[i]], image_size, cx, cy, r)
        images[i][:, mask] = color[:, None]
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), num_classes)


def builtin_dataset(cfg) -> ArrayDataset:
    """``DataConfig`` for a built-in set -> dataset (conditional or not, per ``cfg.conditional``)."""
    if cfg.name == "digits":
        data = load_digits()
    elif cfg.name == "shapes":
        data = make_shapes(cfg.num_samples, cfg.image_size, cfg.num_classes, cfg.seed)
    else:
        raise ConfigError(f"data.name: {cfg.name!r} is not a built-in set (digits, shapes)")
    return data if cfg.conditional else ArrayDataset(data.images, None, 0)


class BatchSource(Protocol):
    """What the loop consumes: the local batch for a given step. A source of latent data may also
    carry ``decode`` (latents -> images in [-1, 1]), which the loop applies to its sample grids."""
    num_classes: int
    image_size: int
    channels: int

    def get(self, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...


class StepBatches:
    """Global batch ``step`` = a slice of an epoch permutation seeded by (seed, epoch); rank r
    takes rows [r·b, (r+1)·b). Pass ``rank=0, world_size=1`` for a dataset that is already this
    rank's share (rank-aware shards)."""

    def __init__(self, data: ArrayDataset, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, flip: bool = False):
        if global_batch % world_size:
            raise ConfigError(f"train.batch_size: {global_batch} not divisible by {world_size} workers")
        self.data, self.global_batch, self.rank, self.world_size = data, global_batch, rank, world_size
        self.seed, self.flip = seed, flip
        self.heldout: Optional[ArrayDataset] = None        # see training_batches
        self.local_batch = global_batch // world_size
        self.per_epoch = max(1, len(data) // global_batch)
        self._perm_epoch, self._perm = -1, None
        self.num_classes, self.image_size, self.channels = data.num_classes, data.image_size, data.channels

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            reps = -(-self.global_batch // len(self.data))            # tile tiny datasets
            self._perm = torch.cat([torch.randperm(len(self.data), generator=g) for _ in range(reps)])
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        epoch, j = divmod(step, self.per_epoch)
        rows = self._permutation(epoch)[j * self.global_batch:(j + 1) * self.global_batch]
        return rows[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]

    def get(self, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        idx = self.indices(step)
        x0 = self.data.images[idx]
        if self.flip:
            g = torch.Generator().manual_seed(self.seed * 7_919 + step)
            flips = (torch.rand(self.global_batch, generator=g) < 0.5)[
                self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
            x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
        y = None if self.data.labels is None else self.data.labels[idx]
        return x0, y


def training_batches(cfg, rank: int = 0, world_size: int = 1) -> "StepBatches":
    """The batches of a run on a built-in set; with ``data.holdout`` the held-out share is kept
    out of training and attached as ``batches.heldout`` (at most 512 images)."""
    data = builtin_dataset(cfg.data)
    heldout = None
    if cfg.data.holdout > 0:
        data, heldout = data.split(cfg.data.holdout, seed=cfg.data.seed)
        heldout = ArrayDataset(heldout.images[:512], None if heldout.labels is None else heldout.labels[:512],
                               heldout.num_classes)
    batches = StepBatches(data, cfg.train.batch_size, rank, world_size, cfg.train.seed, cfg.data.flip)
    batches.heldout = heldout
    return batches


def builtin_geometry(cfg) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) of a built-in set from its config, without loading it."""
    if cfg.name == "digits":
        channels, size, classes = 1, 8, 10
    elif cfg.name == "shapes":
        channels, size, classes = 3, cfg.image_size, cfg.num_classes
    else:
        raise ConfigError(f"data.name: {cfg.name!r} is not a built-in set; its geometry comes from its files")
    return channels, size, classes if cfg.conditional else 0
