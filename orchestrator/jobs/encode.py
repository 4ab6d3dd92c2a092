"""``denoiselab data prepare SOURCE --encoder ENC``: images -> a latent dataset, as a Ray job.

The source (an image folder, a denoiselab pixel dataset, an ``.npz``, ``digits`` or ``shapes``) is
cut into shards of ``--shard-size`` images. Each shard is one Ray task (one GPU per task when the
cluster has GPUs, else CPUs): it reads and crops its images (ADM's recipe,
``orchestrator/infra/image_files.py``), encodes them with the ``AutoencoderKL`` shipped through the
object store (``orchestrator/infra/encoder.py``) and writes ``part-NNNNN.parquet`` itself
(``orchestrator/infra/latents.py``). A shard file appears only when it is complete (local: written
under a temporary name and renamed; S3: objects appear on completion), so an interrupted encode
re-run with the same command encodes only the missing shards. ``_plan.json`` records the settings;
re-running into the same ``--out`` with other settings is refused. The manifest is written last.

Image folders are read by the tasks themselves: on a multi-node cluster the folder must be visible
on every node (a shared mount), or prepare a pixel dataset on object storage first
(``denoiselab data prepare FOLDER --out s3://…``) and encode that.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pyarrow.parquet as pq
import torch

from orchestrator.infra.data_io import META_FILE, from_npz, read_dataset
from orchestrator.infra.encoder import EncoderPayload, build_autoencoder, encode_uint8
from orchestrator.infra.image_files import list_image_folder, load_image, mode_summary, resize_uint8
from orchestrator.infra.latents import LATENTS, STORES, latent_columns, shard_table
from orchestrator.infra.storage import Storage, open_storage
from trainers.config import DataConfig
from trainers.data import ArrayDataset, builtin_dataset
from trainers.errors import ConfigError, DataError, UserError
from trainers.eval.reference import from_uint8, to_uint8

__all__ = ["EncodeRequest", "ImageSource", "open_source", "encode_source", "encode_shard",
           "describe", "source_dataset", "PLAN_FILE"]

PLAN_FILE = "_plan.json"


@dataclass
class ImageSource:
    """What to encode: file paths (read by the tasks) or uint8 arrays (shipped to them)."""
    description: dict                       # goes to the manifest ("source")
    count: int
    num_classes: int
    native_size: Optional[int]              # square arrays: their size; folders: None
    files: Optional[list[str]] = None
    arrays: Optional[np.ndarray] = None     # uint8 [N, H, W, C]
    labels: Optional[np.ndarray] = None
    skipped: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode())
        if self.files is not None:
            for f in self.files:
                st = os.stat(f)
                digest.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
        else:
            digest.update(np.ascontiguousarray(self.arrays).tobytes())
        if self.labels is not None:
            digest.update(np.asarray(self.labels, np.int64).tobytes())
        return digest.hexdigest()


def open_source(source: str, *, image_size: int = 16, num_classes: int = 4, num_samples: int = 4096,
                seed: int = 0, endpoint: Optional[str] = None, region: Optional[str] = None) -> ImageSource:
    if source in ("digits", "shapes"):
        cfg = DataConfig(name=source, image_size=image_size, num_classes=num_classes, num_samples=num_samples,
                         seed=seed)
        data = builtin_dataset(cfg)
        desc = {"kind": "builtin", "name": source, "image_size": data.image_size, "num_classes": data.num_classes,
                "num_samples": len(data), "seed": seed}
        return _from_arrays(data, desc)
    if source.endswith(".npz"):
        data = from_npz(source)
        return _from_arrays(data, {"kind": "npz", "path": str(Path(source).resolve())})
    storage = open_storage(source, endpoint, region, fail_fast=True)
    if storage.exists(META_FILE):
        meta = json.loads(storage.read_bytes(META_FILE))
        if meta.get("kind") == LATENTS:
            raise DataError(f"{source}: is already a latent dataset; encode the images it came from")
        return _from_arrays(read_dataset(open_storage(source, endpoint, region)),
                            {"kind": "parquet", "uri": storage.uri})
    if source.startswith("s3://"):
        raise DataError(f"{source}: has no {META_FILE}; encode a local image folder or a denoiselab pixel dataset")
    listing = list_image_folder(source)
    labels = np.asarray(listing.labels, np.int64) if listing.classes else None
    return ImageSource({"kind": "folder", "path": str(Path(source).resolve()), "classes": listing.classes},
                       len(listing.files), len(listing.classes), None, files=listing.files, labels=labels,
                       skipped=tuple(listing.skipped))


def _from_arrays(data, desc: dict) -> ImageSource:
    arrays = to_uint8(data.images)
    labels = None if data.labels is None else data.labels.numpy().astype(np.int64)
    return ImageSource(desc, len(arrays), data.num_classes, data.image_size, arrays=arrays, labels=labels)


@dataclass(frozen=True)
class EncodeRequest:
    source: str
    out: str
    encoder: str
    resolution: Optional[int] = None        # None: an array source's own size, 256 for folders
    flip: bool = False
    store: str = "posterior"
    scale_factor: Union[str, float] = "config"   # "config" (the encoder's), "auto" (1/std) or a number
    shard_size: int = 256
    batch_size: int = 32
    seed: int = 0
    local: bool = False
    address: Optional[str] = None
    use_gpu: Optional[bool] = None
    endpoint: Optional[str] = None
    region: Optional[str] = None

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise ConfigError(f"--store: {self.store!r} is not one of {', '.join(STORES)}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError("--shard-size / --batch-size: must be >= 1")
        if isinstance(self.scale_factor, str) and self.scale_factor not in ("config", "auto"):
            try:
                object.__setattr__(self, "scale_factor", float(self.scale_factor))
            except ValueError:
                raise ConfigError(f"--scale-factor: {self.scale_factor!r} is not 'config', 'auto' or a number") from None
        if isinstance(self.scale_factor, float) and not self.scale_factor > 0:
            raise ConfigError("--scale-factor: must be > 0")


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _write_table(table, storage: Storage, name: str) -> None:
    """Appear complete or not at all: local files are renamed into place, S3 objects are atomic."""
    storage.fs.create_dir(storage.root, recursive=True)
    if storage.is_remote:
        pq.write_table(table, storage.path(name), filesystem=storage.fs)
        return
    tmp = storage.path(f".{name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, filesystem=storage.fs)
    os.replace(tmp, storage.path(name))


def encode_shard(payload: EncoderPayload, images_or_files, labels: Optional[np.ndarray], index: int, *,
                 resolution: int, flip: bool, store: str, seed: int, out: str, endpoint: Optional[str],
                 region: Optional[str], batch_size: int, device: str = "cpu", threads: int = 1) -> dict:
    """Encode one shard and write it; returns {shard, count, modes, seconds}."""
    started = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    modes: Counter = Counter()
    if isinstance(images_or_files, np.ndarray):
        images = resize_uint8(images_or_files, resolution)
        modes["RGB" if images_or_files.shape[-1] == 3 else "L"] += len(images)
    else:
        loaded = [load_image(f, resolution) for f in images_or_files]
        images = np.stack([a for a, _ in loaded])
        modes.update(m for _, m in loaded)
    model = build_autoencoder(payload, device)
    parts: dict[str, list[torch.Tensor]] = {}
    views = [("", images)] + ([("_flip", np.ascontiguousarray(images[:, :, ::-1]))] if flip else [])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    for suffix, view in views:
        for lo in range(0, len(view), batch_size):
            mean, std = encode_uint8(model, view[lo:lo + batch_size], device)
            if store == "posterior":
                parts.setdefault("mean" + suffix, []).append(mean)
                parts.setdefault("std" + suffix, []).append(std)
            else:
                parts.setdefault("latent" + suffix, []).append(mean + std * torch.randn(mean.shape, generator=gen))
    columns = {name: torch.cat(chunks) for name, chunks in parts.items()}
    _write_table(shard_table(columns, labels), open_storage(out, endpoint, region), _shard_name(index))
    return {"shard": index, "count": len(images), "modes": dict(modes), "seconds": time.perf_counter() - started,
            "latent_shape": list(columns[latent_columns(store, False)[0]].shape[1:])}


def _resolution(req: EncodeRequest, src: ImageSource, payload: EncoderPayload) -> int:
    res = req.resolution or src.native_size or 256
    if res % payload.downsample:
        raise ConfigError(f"--resolution: {res} is not divisible by the encoder's downsampling factor "
                          f"{payload.downsample}")
    return res


def _check_plan(storage: Storage, plan: dict) -> None:
    if storage.exists(PLAN_FILE):
        old = json.loads(storage.read_bytes(PLAN_FILE))
        if old != plan:
            diff = [k for k in plan if old.get(k) != plan[k]]
            raise DataError(f"--out: {storage.uri} holds an encode with other settings ({', '.join(diff)} differ); "
                            f"use a new --out, or delete it to start over")
    else:
        storage.write_bytes(json.dumps(plan, indent=1).encode(), PLAN_FILE)


def _auto_scale(storage: Storage, store: str) -> float:
    """1 / std of the latents in the first shard (LDM §4.3.2's rescaling), posterior noise included."""
    table = pq.read_table(storage.path(_shard_name(0)), filesystem=storage.fs)

    def col(name: str) -> np.ndarray:
        return np.stack([np.frombuffer(b, np.float16) for b in table.column(name).to_pylist()]).astype(np.float64)

    if store == "posterior":
        var = col("mean").var() + (col("std") ** 2).mean()
    else:
        var = col("latent").var()
    if not var > 0:
        raise DataError("--scale-factor auto: the first shard's latents have zero variance; pass a number")
    return float(1.0 / np.sqrt(var))


def _run_tasks(req: EncodeRequest, payload: EncoderPayload, src: ImageSource, todo: list[tuple[int, int, int]],
               common: dict) -> list[dict]:
    def chunk(lo: int, hi: int):
        return src.arrays[lo:hi] if src.arrays is not None else src.files[lo:hi]

    def labels(lo: int, hi: int):
        return None if src.labels is None else src.labels[lo:hi]

    if req.local or not todo:
        device = "cuda" if req.use_gpu and torch.cuda.is_available() else "cpu"
        out = []
        for i, lo, hi in todo:
            out.append(encode_shard(payload, chunk(lo, hi), labels(lo, hi), i, device=device,
                                    threads=torch.get_num_threads(), **common))
            _progress(out[-1], len(out), len(todo))
        return out
    import ray                                                            # RAY
    from orchestrator.infra.session import connect_ray
    connect_ray(req.address)
    gpu = req.use_gpu if req.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(encode_shard).options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=2,
                                            retry_exceptions=False)
    ref = ray.put(payload)                                                # RAY: weights shipped once
    pending = {task.remote(ref, chunk(lo, hi), labels(lo, hi), i, device="cuda" if gpu else "cpu", threads=1,
                           **common): i for i, lo, hi in todo}
    out = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for fut in done:
                pending.pop(fut)
                out.append(ray.get(fut))
                _progress(out[-1], len(out), len(todo))
    except ray.exceptions.RayTaskError as err:
        for fut in pending:
            ray.cancel(fut, force=True)
        cause = getattr(err, "cause", None)
        raise (cause if isinstance(cause, UserError) else err) from None
    return out


def _progress(result: dict, k: int, n: int) -> None:
    print(f"encoded shard {result['shard']:>5d} ({result['count']} images, {result['seconds']:.1f} s)  {k}/{n}",
          file=sys.stderr, flush=True)


def encode_source(req: EncodeRequest, payload: EncoderPayload, src: ImageSource) -> dict:
    resolution = _resolution(req, src, payload)
    storage = open_storage(req.out, req.endpoint, req.region, fail_fast=True)
    storage.check()
    storage = open_storage(req.out, req.endpoint, req.region)
    plan = {"source": src.fingerprint(), "encoder": payload.sha256, "resolution": resolution, "flip": req.flip,
            "store": req.store, "shard_size": req.shard_size, "seed": req.seed, "count": src.count}
    _check_plan(storage, plan)
    bounds = [(i, lo, min(lo + req.shard_size, src.count)) for i, lo in enumerate(range(0, src.count, req.shard_size))]
    present = set(storage.listdir())
    todo = [b for b in bounds if _shard_name(b[0]) not in present]
    if len(todo) < len(bounds):
        print(f"resuming: {len(bounds) - len(todo)} of {len(bounds)} shard(s) already encoded", file=sys.stderr)
    common = dict(resolution=resolution, flip=req.flip, store=req.store, seed=req.seed, out=storage.uri,
                  endpoint=req.endpoint, region=req.region, batch_size=req.batch_size)
    started = time.perf_counter()
    results = _run_tasks(req, payload, src, todo, common)
    seconds = time.perf_counter() - started
    size = resolution // payload.downsample
    shape = [payload.latent_channels, size, size]
    scale = (payload.scaling_factor if req.scale_factor == "config"
             else _auto_scale(storage, req.store) if req.scale_factor == "auto" else float(req.scale_factor))
    modes = Counter()
    for r in results:
        modes.update(r["modes"])
    manifest = {"format": 1, "kind": LATENTS, "channels": shape[0], "image_size": size,
                "num_classes": src.num_classes, "count": src.count, "shards": [_shard_name(i) for i, _, _ in bounds],
                "store": req.store, "flip": req.flip, "resolution": resolution,
                "encoder": {"path": payload.path, "sha256": payload.sha256, "scaling_factor": scale,
                            "shift_factor": payload.shift_factor, "downsample": payload.downsample},
                "source": src.description,
                "encoding": {"images": sum(r["count"] for r in results), "seconds": round(seconds, 3),
                             "converted": mode_summary(modes), "skipped": list(src.skipped)}}
    storage.write_bytes(json.dumps(manifest, indent=1).encode(), META_FILE)
    return manifest


def source_dataset(meta: dict, endpoint: Optional[str] = None, region: Optional[str] = None) -> ArrayDataset:
    """The images a latent dataset was encoded from, cropped as they were encoded: the real data
    that decoded samples are scored against."""
    desc, res = meta["source"], int(meta["resolution"])
    if desc["kind"] == "builtin":
        src = open_source(desc["name"], image_size=desc["image_size"], num_classes=desc["num_classes"],
                          num_samples=desc["num_samples"], seed=desc["seed"])
    else:
        where = desc.get("path") or desc.get("uri")
        try:
            src = open_source(where, endpoint=endpoint, region=region)
        except DataError as err:
            raise DataError(f"evaluation: the images this latent set was encoded from are needed as the real data "
                            f"({err})") from None
    if src.arrays is not None:
        images = resize_uint8(src.arrays, res)
    else:
        images = np.stack([load_image(f, res)[0] for f in src.files])
    labels = None if src.labels is None else torch.from_numpy(src.labels)
    return ArrayDataset(from_uint8(images), labels, src.num_classes)


def describe(manifest: dict, uri: str) -> str:
    enc = manifest["encoding"]
    rate = enc["images"] / enc["seconds"] if enc["seconds"] > 0 else float("nan")
    lines = [f"wrote {manifest['count']} latents ({manifest['channels']}x{manifest['image_size']}x"
             f"{manifest['image_size']} from {manifest['resolution']}px images, {manifest['num_classes']} classes, "
             f"{manifest['store']}{', with flips' if manifest['flip'] else ''}) in {len(manifest['shards'])} shard(s) "
             f"to {uri}; scale factor {manifest['encoder']['scaling_factor']:.6g}",
             f"encoded {enc['images']} images in {enc['seconds']:.1f} s ({rate:.1f} images/s)"]
    if enc["converted"]:
        lines.append(enc["converted"])
    if enc["skipped"]:
        shown = ", ".join(enc["skipped"][:5]) + (" …" if len(enc["skipped"]) > 5 else "")
        lines.append(f"skipped {len(enc['skipped'])} non-image file(s): {shown}")
    return "\n".join(lines)

