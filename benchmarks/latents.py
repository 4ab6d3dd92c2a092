"""Latent diffusion: encoding throughput, and training on stored latents vs random tensors.

1. Encoding (images/s): ``encode_shard`` in this process (crop + AutoencoderKL posterior + fp16
   Parquet write) for the tiny random encoder at 16 px and for an encoder of the Stable Diffusion
   VAE's architecture (4 stages, 128-512 channels, random weights: speed does not depend on them)
   at 256 px.
2. Training (images/s): the same DiT and loop fed (a) by the worker's real data path, Ray Data
   streaming the Parquet shards (``LatentBatches``: fp16 rows -> posterior draw -> scale), and
   (b) by random tensors of the same shape already in memory. Interleaved rounds, medians.
   Target: (a) >= 0.97 x (b).

    .venv/bin/python benchmarks/latents.py [--model DiT-T/2] [--resolution 32] [--batch 32]
                                           [--rounds 5] [--steps 20] [--sd-images 8]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import emit, median, print_table  # noqa: E402
from orchestrator.infra.encoder import EncoderPayload, init_encoder, load_payload  # noqa: E402
from orchestrator.jobs.encode import EncodeRequest, encode_shard, encode_source, open_source  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.loop import build_state  # noqa: E402
from trainers.runtime import LocalRuntime  # noqa: E402
from trainers.step import train_step  # noqa: E402


def _sd_vae_payload() -> EncoderPayload:
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return EncoderPayload(dict(model.config), model.state_dict(), sha256="sd-vae-architecture")


def encode_rate(payload: EncoderPayload, images: np.ndarray, resolution: int, out: str, batch: int) -> float:
    encode_shard(payload, images[:batch], None, 99, resolution=resolution, flip=False, store="posterior", seed=0,
                 out=out, endpoint=None, region=None, batch_size=batch, threads=torch.get_num_threads())  # warm-up
    started = time.perf_counter()
    encode_shard(payload, images, None, 0, resolution=resolution, flip=False, store="posterior", seed=0, out=out,
                 endpoint=None, region=None, batch_size=batch, threads=torch.get_num_threads())
    return len(images) / (time.perf_counter() - started)


class RandomLatents:
    def __init__(self, shape, batch: int, num_classes: int):
        gen = torch.Generator().manual_seed(0)
        self.pool = torch.randn((8 * batch, *shape), generator=gen)
        self.labels = torch.randint(0, num_classes, (8 * batch,), generator=gen)
        self.batch, self.num_classes, self.channels, self.image_size = batch, num_classes, shape[0], shape[1]

    def get(self, step: int):
        lo = (step % 8) * self.batch
        return self.pool[lo:lo + self.batch], self.labels[lo:lo + self.batch]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="DiT-T/2")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sd-images", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="dl-bench-latents-"))
    init_encoder(str(work / "vae"))
    tiny = load_payload(str(work / "vae"))
    shapes16 = open_source("shapes", num_samples=512, image_size=16)
    rows = [{"encoder": "tiny random (32,64)", "pixels": 16, "latent": "4x8x8",
             "images/s": encode_rate(tiny, shapes16.arrays, 16, str(work / "enc16"), 64)}]
    if args.sd_images > 0:
        sd = _sd_vae_payload()
        big = open_source("shapes", num_samples=args.sd_images, image_size=256)
        rows.append({"encoder": "SD-VAE architecture", "pixels": 256, "latent": "4x32x32",
                     "images/s": encode_rate(sd, big.arrays, 256, str(work / "enc256"), 4)})
    print_table(rows, ["encoder", "pixels", "latent", "images/s"])

    # training: Ray Data over the stored shards vs random tensors, same model and loop
    import ray
    from orchestrator.runs.worker import LatentBatches
    req = EncodeRequest("shapes", str(work / "lat"), str(work / "vae"), resolution=args.resolution, local=True,
                        flip=True, scale_factor="auto", shard_size=512)
    meta = encode_source(req, tiny, open_source("shapes", num_samples=2048, image_size=args.resolution))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(str(work / "lat"), file_extensions=["parquet"])
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    sources = {"latents (Ray Data)": LatentBatches(ds.iterator(), meta, args.batch, 0, 0, True),
               "random tensors": RandomLatents(shape, args.batch, meta["num_classes"])}
    cfg = load_config({"model": {"name": args.model}, "data": {"name": "latents", "path": str(work / "lat")},
                       "train": {"batch_size": args.batch}})
    states = {k: build_state(cfg, LocalRuntime("cpu"), src) for k, src in sources.items()}
    times: dict[str, list[float]] = {k: [] for k in sources}
    step = {k: 0 for k in sources}
    for r in range(args.rounds + 1):
        for name, src in sources.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                x0, y = src.get(step[name])
                train_step(states[name], x0, y, step[name])
                step[name] += 1
            if r > 0:                                                     # round 0 warms up
                times[name].append((time.perf_counter() - started) / args.steps)
    for src in sources.values():                                          # close the stream before Ray
        src._it = None
    import gc
    gc.collect()
    ray.shutdown()
    base = median(times["random tensors"])
    train_rows = [{"data": k, "ms/step": 1000 * median(v), "images/s": args.batch / median(v),
                   "vs random": base / median(v)} for k, v in times.items()]
    print(f"\ntraining {args.model} on {shape[0]}x{shape[1]}x{shape[2]} latents, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps (medians)")
    print_table(train_rows, ["data", "ms/step", "images/s", "vs random"])
    emit({"encode": rows, "train": train_rows})


if __name__ == "__main__":
    main()
