"""Sampling from checkpoints, in this process or split across Ray tasks (CPU or GPU).

The network is rebuilt from the checkpoint's own config (``model_from_state``) and sampled with
the trainers' DDPM (Ho et al. 2020, Alg. 2) / DDIM (Song et al. 2021, Eq. 12) sampler.

Seeds. Samples are drawn in fixed blocks of ``SEED_BLOCK``: block b holds samples
[b·B, (b+1)·B), its noise comes from one generator seeded with ``block_seed(seed, b)`` and sample
i gets class ``i mod K``. The last block is drawn whole and truncated, so sample i is a function
of (seed, i) and the sampler settings only: never of N, of the number of workers, or of which
worker drew which block. Workers get contiguous runs of blocks; the driver puts them back in
seed order.

Outputs (``write_samples``; a local directory or ``s3://``)::

    samples.npz       arr_0 uint8 [N, H, W, 3] (+ arr_1 labels): the ADM evaluation suite's input
    parquet/          the denoiselab dataset format (orchestrator/infra/data_io.py), row i = sample i
    grid.png          the first 100 samples
    samples.json      seed, sampler settings, checkpoint, worker count
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch

from orchestrator.infra.data_io import write_dataset
from orchestrator.infra.storage import open_storage
from trainers.build import expert_set_from_state, network_from_state
from trainers.config import RunConfig, load_config
from trainers.data import ArrayDataset
from trainers.diffusion import sample
from trainers.errors import ConfigError
from trainers.eval.reference import from_uint8, to_uint8
from trainers.images import make_grid, png_bytes

__all__ = ["model_from_state", "SampleSpec", "SampleSet", "slim_state", "sample_blocks",
           "sample_images", "write_samples", "attach_decoder", "sampling_mode", "num_blocks", "block_seed", "SEED_BLOCK", "GRID_MAX"]

SEED_BLOCK = 64
GRID_MAX = 100


def model_from_state(state: dict, use_ema: bool = True, device: str = "cpu"):
    """(network, diffusion, cfg, spec) rebuilt from a checkpoint state (an expert set: its router)."""
    if state.get("kind") == "expert_set":
        return expert_set_from_state(state, device=device)
    return network_from_state(state, use_ema=use_ema, device=device)


def slim_state(state: dict, use_ema: bool = True) -> dict:
    """Only what sampling needs (one set of CPU weights, config, spec, intervals, the decoder of
    latent data): what goes to workers, which may have no GPU even when training had one. An
    expert set is already slim."""
    if state.get("kind") == "expert_set":
        return {k: v for k, v in state.items() if k != "manifest"}
    weights = {k: v.detach().cpu() for k, v in (state["ema"] if use_ema else state["model"]).items()}
    slim = {"config": state["config"], "model_spec": state["model_spec"], "intervals": state["intervals"],
            "step": state.get("step", 0), "ema": weights, "model": weights}
    if "decoder" in state:
        slim["decoder"] = state["decoder"]
    return slim


def attach_decoder(state: dict) -> dict:
    """A state of a run on latents gets the decoder of its dataset (``decoder``: latents -> images),
    read where the manifest (or ``data.encoder``) says and checked against the manifest's hash."""
    data = state.get("config", {}).get("data", {})
    if "decoder" in state or data.get("name") != "latents":
        return state
    from orchestrator.infra.data_io import read_metadata
    from orchestrator.infra.latents import load_decoder
    store = state["config"].get("storage", {})
    meta = read_metadata(open_storage(data["path"], store.get("endpoint"), store.get("region")))
    return {**state, "decoder": load_decoder(meta, data.get("encoder"))}


@dataclass(frozen=True)
class SampleSpec:
    n: int
    seed: int = 0
    steps: Optional[int] = None        # None: the run's sample.steps
    sampler: Optional[str] = None      # ddpm | ddim; None: the run's sample.sampler
    guidance: Optional[float] = None
    eta: Optional[float] = None
    use_ema: bool = True
    block: int = SEED_BLOCK

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"--n: must be >= 1, got {self.n}")
        if self.block < 1:
            raise ConfigError(f"block: must be >= 1, got {self.block}")

    def run_config(self, cfg: RunConfig) -> RunConfig:
        """The run's config with this spec's sampler settings applied."""
        over = {k: v for k, v in {"steps": self.steps, "sampler": self.sampler, "guidance": self.guidance,
                                  "eta": self.eta}.items() if v is not None}
        return cfg.replace(sample=replace(cfg.sample, **over))


@dataclass
class SampleSet:
    images: np.ndarray                 # uint8 [N, H, W, C], row i = sample i
    labels: Optional[np.ndarray]       # int64 [N] (class i mod K) or None
    num_classes: int
    indices: np.ndarray                # sample indices as returned by the workers, in row order
    meta: dict


def sampling_mode(n: int, workers: Optional[int], local: bool) -> tuple[bool, int]:
    """(in process?, Ray tasks): ``--local``, or one seed block without ``--workers``, stays in
    process (starting Ray costs seconds); else ``--workers`` or one task per 256 samples, at most 8."""
    if local or (workers is None and n <= SEED_BLOCK):
        return True, 1
    return False, workers if workers is not None else min(8, max(1, -(-n // 256)))


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_seed(seed: int, b: int) -> int:
    return int(seed) * 1_000_003 + int(b)


def sample_blocks(state: dict, spec: SampleSpec, blocks: list[int], device: str = "cpu") -> dict:
    """Draw the given seed blocks in this process -> {indices, images uint8, labels, pid}."""
    model, diffusion, cfg, mspec = model_from_state(state, use_ema=True, device=device)
    cfg = spec.run_config(cfg)
    k, size, ch = mspec["num_classes"], mspec["image_size"], mspec["channels"]
    idx, images, labels = [], [], []
    for b in blocks:
        lo, hi = b * spec.block, min((b + 1) * spec.block, spec.n)
        full = torch.arange(b * spec.block, (b + 1) * spec.block)
        y = (full % k).to(device) if k > 0 else None
        gen = torch.Generator().manual_seed(block_seed(spec.seed, b))
        x = sample(model, diffusion, (spec.block, ch, size, size), steps=cfg.sample.steps,
                   sampler=cfg.sample.sampler, y=y, null_class=k if k > 0 else None,
                   guidance=cfg.sample.guidance, eta=cfg.sample.eta, generator=gen, device=device,
                   clip_x0=cfg.clip_x0)
        if state.get("decoder") is not None:                                  # latents -> images
            x = state["decoder"](x)
        images.append(to_uint8(x[:hi - lo]))                                  # [n_b, H, W, C]
        idx.append(np.arange(lo, hi))
        if k > 0:
            labels.append(full[:hi - lo].numpy() % k)
    empty = np.zeros((0, size, size, ch), np.uint8)
    return {"indices": np.concatenate(idx) if idx else np.zeros(0, np.int64),
            "images": np.concatenate(images) if images else empty,
            "labels": np.concatenate(labels).astype(np.int64) if labels else None, "pid": os.getpid()}


def _sample_task(state: dict, spec: dict, blocks: list[int], device: str, threads: int) -> dict:
    torch.set_num_threads(max(1, threads))
    return sample_blocks(state, SampleSpec(**spec), blocks, device)


def _distribute(state: dict, spec: SampleSpec, workers: int, use_gpu: Optional[bool],
                cpus_per_worker: float) -> list[dict]:
    import ray                                                            # RAY
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    chunks = [c.tolist() for c in np.array_split(np.arange(num_blocks(spec.n, spec.block)), workers) if len(c)]
    task = ray.remote(_sample_task).options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0,
                                            scheduling_strategy="DEFAULT", max_retries=2)
    ref = ray.put(state)                                                  # RAY: weights shipped once
    futures = [task.remote(ref, asdict(spec), chunk, "cuda" if use_gpu else "cpu", int(cpus_per_worker))
               for chunk in chunks]
    return ray.get(futures)                                               # RAY


def sample_images(state: dict, spec: SampleSpec, *, workers: int = 1, local: bool = False,
                  use_gpu: Optional[bool] = None, cpus_per_worker: float = 1.0,
                  device: Optional[str] = None) -> SampleSet:
    """N samples from a checkpoint state, in process (``local``) or over ``workers`` Ray tasks."""
    if workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {workers}")
    state = attach_decoder(slim_state(state, spec.use_ema))
    if local:
        device = device or ("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        parts = [sample_blocks(state, spec, list(range(num_blocks(spec.n, spec.block))), device)]
    else:
        parts = _distribute(state, spec, workers, use_gpu, cpus_per_worker)
    indices = np.concatenate([p["indices"] for p in parts])
    order = np.argsort(indices, kind="stable")
    images = np.concatenate([p["images"] for p in parts])[order]
    labels = np.concatenate([p["labels"] for p in parts])[order] if parts[0]["labels"] is not None else None
    cfg = spec.run_config(load_config(state["config"]))
    meta = {"n": spec.n, "seed": spec.seed, "block": spec.block, "sampler": cfg.sample.sampler,
            "steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "eta": cfg.sample.eta,
            "weights": "ema" if spec.use_ema else "raw", "checkpoint_step": int(state.get("step", 0)),
            "workers": len({p["pid"] for p in parts}), "tasks": len(parts), "local": local}
    return SampleSet(images, labels, int(state["model_spec"]["num_classes"]), indices[order], meta)


def _grid(images: np.ndarray, scale: int) -> bytes:
    return png_bytes(make_grid(from_uint8(images[:GRID_MAX]), scale=scale))


def write_samples(result: SampleSet, out: str, endpoint: Optional[str] = None, shard_size: int = 1024) -> dict:
    """``out`` ending in .png: the grid only. Otherwise a directory with samples.npz, parquet/,
    grid.png and samples.json. Local paths or s3://. Returns {what: uri}."""
    scale = max(1, 64 // result.images.shape[1])
    if out.endswith(".png"):
        parent, name = os.path.split(out)
        return {"grid": open_storage(parent or ".", endpoint).write_bytes(_grid(result.images, scale), name)}
    storage = open_storage(out, endpoint, fail_fast=True)
    storage.check()
    rgb = result.images if result.images.shape[-1] == 3 else np.repeat(result.images[..., :1], 3, axis=-1)
    buf = io.BytesIO()
    arrays = {"arr_0": rgb} if result.labels is None else {"arr_0": rgb, "arr_1": result.labels}
    np.savez(buf, **arrays)
    paths = {"npz": storage.write_bytes(buf.getvalue(), "samples.npz")}
    data = ArrayDataset(from_uint8(result.images), None if result.labels is None else torch.from_numpy(result.labels),
                        result.num_classes if result.labels is not None else 0)
    write_dataset(data, storage, "parquet", shard_size=shard_size)
    paths["parquet"] = storage.uri_of("parquet")
    paths["grid"] = storage.write_bytes(_grid(result.images, scale), "grid.png")
    paths["meta"] = storage.write_bytes(json.dumps({**result.meta, "outputs": paths}, indent=1).encode(),
                                        "samples.json")
    return paths
