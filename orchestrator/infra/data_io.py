"""The denoiselab Parquet dataset format, and ``denoiselab data prepare``.

A dataset is a directory (local or ``s3://``) of shards ``part-00000.parquet`` … plus
``_denoiselab.json`` ({format, image_size, channels, num_classes, count}). Columns:

* ``image``  binary, raw uint8 pixels in H×W×C order (C = 1 or 3)
* ``label``  int64, present when the set has classes

Readers are rank-aware: rank r of W reads shards r, r+W, … (disjoint), or streams its share
through Ray Data (``orchestrator/runs/worker.py``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from orchestrator.infra.storage import Storage
from trainers.data import ArrayDataset, builtin_geometry
from trainers.errors import DataError

__all__ = ["write_dataset", "read_metadata", "read_dataset", "decode_batch", "from_npz", "from_image_folder",
           "run_geometry", "check_kind", "META_FILE"]

META_FILE = "_denoiselab.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] -> uint8 [N, H, W, C]."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).contiguous().numpy()


def write_dataset(data: ArrayDataset, storage: Storage, *parts: str, shard_size: int = 1024) -> dict:
    """Write ``data`` as Parquet shards under ``storage.path(*parts)``; returns the metadata."""
    pixels = _to_uint8_hwc(data.images)
    n = len(pixels)
    shards = []
    for i, start in enumerate(range(0, n, shard_size)):
        chunk = pixels[start:start + shard_size]
        cols = {"image": pa.array([row.tobytes() for row in chunk], type=pa.binary())}
        if data.labels is not None:
            cols["label"] = pa.array(data.labels[start:start + shard_size].numpy().astype(np.int64))
        name = f"part-{i:05d}.parquet"
        target = storage.path(*parts, name)
        storage.fs.create_dir(str(Path(target).parent) if not storage.is_remote else target.rsplit("/", 1)[0],
                              recursive=True)
        pq.write_table(pa.table(cols), target, filesystem=storage.fs)
        shards.append(name)
    meta = {"format": 1, "image_size": data.image_size, "channels": data.channels,
            "num_classes": data.num_classes, "count": n, "shards": shards}
    storage.write_bytes(json.dumps(meta, indent=1).encode(), *parts, META_FILE)
    return meta


def read_metadata(storage: Storage, *parts: str) -> dict:
    if not storage.exists(*parts, META_FILE):
        raise DataError(f"data.path: {storage.uri_of(*parts)} has no {META_FILE}; create the dataset with "
                        f"`denoiselab data prepare`")
    return json.loads(storage.read_bytes(*parts, META_FILE))


def run_geometry(cfg, meta: Optional[dict] = None) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) a run config trains on: a built-in set from its config,
    a Parquet set from its metadata (``meta``, or read from ``data.path``)."""
    if not cfg.data.stored:
        return builtin_geometry(cfg.data)
    if meta is None:
        from orchestrator.infra.storage import open_storage
        meta = read_metadata(open_storage(cfg.data.path, cfg.storage.endpoint, cfg.storage.region, fail_fast=True))
    check_kind(cfg, meta)
    return meta["channels"], meta["image_size"], meta["num_classes"] if cfg.data.conditional else 0


def check_kind(cfg, meta: dict) -> None:
    """``data.name`` agrees with what the manifest holds (pixels or latents)."""
    latents = meta.get("kind") == "latents"
    if latents and cfg.data.name != "latents":
        raise DataError(f"data.name: {cfg.data.path} holds latents; set data.name=latents")
    if not latents and cfg.data.name == "latents":
        raise DataError(f"data.name: {cfg.data.path} holds pixel images, not latents; set data.name=parquet, or "
                        f"encode it with `denoiselab data prepare {cfg.data.path} --encoder ENC --out DIR`")
    if latents and cfg.data.flip and not meta.get("flip"):
        raise DataError(f"data.flip: {cfg.data.path} was encoded without flipped latents; set data.flip=false "
                        f"or re-encode with --flip")


def decode_batch(images: Iterable[bytes], labels: Optional[np.ndarray], meta: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Raw rows -> ([N, C, H, W] in [−1, 1], labels or None)."""
    s, c = meta["image_size"], meta["channels"]
    arr = np.stack([np.frombuffer(b, dtype=np.uint8) for b in images]).reshape(-1, s, s, c)
    x = torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0
    y = torch.from_numpy(np.array(labels, dtype=np.int64)) if labels is not None and meta["num_classes"] > 0 else None
    return x.contiguous(), y


def read_dataset(storage: Storage, *parts: str, rank: int = 0, world_size: int = 1) -> ArrayDataset:
    """This rank's share (shards rank, rank+W, …) as an in-memory dataset."""
    meta = read_metadata(storage, *parts)
    mine = meta["shards"][rank::world_size]
    if not mine:
        raise DataError(f"data.path: {len(meta['shards'])} shard(s) cannot feed {world_size} workers; "
                        f"re-run `denoiselab data prepare` with a smaller --shard-size")
    images, labels = [], []
    for name in mine:
        table = pq.read_table(storage.path(*parts, name), filesystem=storage.fs)
        lab = table.column("label").to_numpy() if "label" in table.column_names else None
        x, y = decode_batch(table.column("image").to_pylist(), lab, meta)
        images.append(x)
        if y is not None:
            labels.append(y)
    return ArrayDataset(torch.cat(images), torch.cat(labels) if labels else None, meta["num_classes"])


def from_npz(path: str) -> ArrayDataset:
    """``images`` uint8 [N, H, W] or [N, H, W, C] (or float in [−1, 1]), optional ``labels``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(p) as npz:
            images = np.asarray(npz["images"])
            labels = np.asarray(npz["labels"]) if "labels" in npz.files else None
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"{path}: expected an .npz with an 'images' array ({err})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: images must be [N, H, W] or [N, H, W, C] with C in (1, 3); got {images.shape}")
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    if images.dtype == np.uint8:
        x = x / 127.5 - 1.0
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    return ArrayDataset(x.contiguous(), torch.from_numpy(labels.astype(np.int64)) if labels is not None else None,
                        num_classes)


def from_image_folder(path: str) -> ArrayDataset:
    """Images in ``path`` (unlabelled) or in ``path/<class>/`` subfolders (labelled, sorted names)."""
    from PIL import Image, UnidentifiedImageError
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{path}: not a directory of images")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = ([(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())] if classes
             else [(f, -1) for f in sorted(root.iterdir())])
    files = [(f, i) for f, i in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays, first = [], None
    for f, _ in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise DataError(f"{f}: not a readable image ({type(err).__name__}); remove or replace the file "
                            f"(nothing was written)") from None
        if first is None:
            first = (f, arr.shape)
        if arr.shape != first[1]:
            raise DataError(f"{f}: size {arr.shape[1]}x{arr.shape[0]} differs from {first[0].name} "
                            f"({first[1][1]}x{first[1][0]}); resize the folder to one size first")
        if arr.shape[0] != arr.shape[1]:
            raise DataError(f"{f}: images must be square, got {arr.shape[1]}x{arr.shape[0]}")
        arrays.append(arr)
    x = torch.from_numpy(np.stack(arrays).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0
    labels = torch.tensor([i for _, i in files]) if classes else None
    return ArrayDataset(x.contiguous(), labels, len(classes))
