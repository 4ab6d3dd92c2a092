"""The denoiselab latent dataset format, and how a training batch is drawn from it.

A latent dataset is a directory (local or ``s3://``) of Parquet shards ``part-00000.parquet`` … and
a manifest ``_denoiselab.json`` with ``kind: latents``. Columns (fp16 bytes, C×h×w in C order):

* ``mean``, ``std``     the encoder's posterior (``store: posterior``, the default), or
* ``latent``            one posterior sample drawn at encoding time (``store: sample``);
* ``mean_flip`` …       the same for the horizontally flipped image (``flip: true``);
* ``label``             int64 class index, when the source has classes.

Latents are stored unscaled. A training sample is z = (mean + std·ε − shift) · scale, with ε fresh
at every step (LDM trains on posterior samples; Rombach et al. 2022 §3), and when flips are stored,
the flipped latent is used with probability ½. The randomness is seeded by (seed, step, rank), so
a step's latents do not depend on earlier steps.

Manifest fields: ``format``, ``kind``, ``channels`` and ``image_size`` (the latent's shape, what the
model sees), ``num_classes``, ``count``, ``shards``, ``store``, ``flip``, ``resolution`` (pixels),
``encoder`` {path, sha256, scaling_factor, shift_factor, downsample}, ``source`` (what was encoded).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import torch

from trainers.errors import DataError

__all__ = ["LATENTS", "STORES", "latent_columns", "shard_table", "draw_latents", "is_latents", "LatentDecoder",
           "load_decoder"]

LATENTS = "latents"
STORES = ("posterior", "sample")


def is_latents(meta: Optional[dict]) -> bool:
    return bool(meta) and meta.get("kind") == LATENTS


def latent_columns(store: str, flip: bool) -> list[str]:
    base = ["mean", "std"] if store == "posterior" else ["latent"]
    return base + ([f"{c}_flip" for c in base] if flip else [])


def _fp16_rows(x: torch.Tensor) -> pa.Array:
    arr = x.to(torch.float16).contiguous().numpy()
    return pa.array([row.tobytes() for row in arr], type=pa.binary())


def shard_table(columns: dict[str, torch.Tensor], labels: Optional[np.ndarray]) -> pa.Table:
    """{column: [N, C, h, w] float} (+ labels) -> one Parquet table of fp16 rows."""
    cols = {name: _fp16_rows(x) for name, x in columns.items()}
    if labels is not None:
        cols["label"] = pa.array(np.asarray(labels, dtype=np.int64))
    return pa.table(cols)


def _rows(values: Iterable[bytes], shape: tuple[int, int, int]) -> torch.Tensor:
    arr = np.stack([np.frombuffer(b, dtype=np.float16) for b in values]).astype(np.float32)
    return torch.from_numpy(arr.reshape(-1, *shape))


def draw_latents(batch: dict, meta: dict, generator: torch.Generator,
                 flip: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One batch of Parquet rows -> (model-space latents [N, C, h, w], labels or None); with
    ``flip`` each row takes its mirrored latent with probability 1/2."""
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    enc = meta["encoder"]
    n = len(batch["mean" if meta["store"] == "posterior" else "latent"])
    mirrored = torch.rand(n, generator=generator) < 0.5 if flip else None

    def column(name: str) -> torch.Tensor:
        plain = _rows(batch[name], shape)
        if mirrored is None:
            return plain
        return torch.where(mirrored[:, None, None, None], _rows(batch[name + "_flip"], shape), plain)

    if meta["store"] == "posterior":
        mean, std = column("mean"), column("std")
        z = mean + std * torch.randn(mean.shape, generator=generator)
    else:
        z = column("latent")
    z = (z - float(enc.get("shift_factor", 0.0))) * float(enc["scaling_factor"])
    labels = batch.get("label")
    y = torch.tensor(np.asarray(labels), dtype=torch.int64) if labels is not None and meta["num_classes"] > 0 else None
    return z.contiguous(), y


@dataclass
class LatentDecoder:
    """Model-space latents -> images in [-1, 1] (what grids, samples and metrics see)."""
    payload: object                       # EncoderPayload
    scale: float
    shift: float = 0.0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        from orchestrator.infra.encoder import decode_latents
        return decode_latents(self.payload, z, self.scale, self.shift)


def load_decoder(meta: dict, override: Optional[str] = None, what: str = "data.encoder") -> LatentDecoder:
    """The decoder of a latent dataset: its encoder, where the manifest says or at ``override``,
    checked against the manifest's SHA-256."""
    from orchestrator.infra.encoder import load_payload
    enc = meta["encoder"]
    path = override or enc["path"]
    if not override and not Path(path).exists():
        raise DataError(f"{what}: the dataset was encoded with {path}, which is not on this machine; set "
                                 f"{what}=PATH to a copy (sha256 {enc['sha256'][:12]}…)")
    payload = load_payload(path, enc["sha256"], what=what)
    return LatentDecoder(payload, float(enc["scaling_factor"]), float(enc.get("shift_factor", 0.0)))
