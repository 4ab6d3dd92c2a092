"""``denoiselab data``: ``prepare`` writes a pixel dataset (digits, shapes, an .npz, an image folder)
or, with ``--encoder``, a latent dataset encoded on Ray; ``init-encoder`` makes a tiny random
``AutoencoderKL`` to try the latent path without downloaded weights."""
from __future__ import annotations

from trainers.errors import UserError

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="write a Parquet dataset (pixels, or latents with --encoder)")
    d.add_argument("source", help="digits | shapes | path/to/file.npz | path/to/image_folder | a pixel dataset "
                                  "(with --encoder)")
    d.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    d.add_argument("--shard-size", type=int, default=None, help="images per shard (1024 pixels, 256 latents)")
    d.add_argument("--image-size", type=int, default=16, help="shapes only")
    d.add_argument("--num-classes", type=int, default=4, help="shapes only")
    d.add_argument("--num-samples", type=int, default=4096, help="shapes only")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--endpoint", help="S3-compatible endpoint for --out")
    lat = d.add_argument_group("latents (with --encoder)")
    lat.add_argument("--encoder", help="diffusers AutoencoderKL directory (config.json + weights) or weights file")
    lat.add_argument("--resolution", type=int, help="pixels after ADM's center crop (default: the source's own "
                                                     "size, 256 for image folders)")
    lat.add_argument("--flip", action="store_true", help="also store the latent of the mirrored image")
    lat.add_argument("--store", choices=("posterior", "sample"), default="posterior",
                     help="posterior mean and std (default; a fresh sample each step) or one sample")
    lat.add_argument("--scale-factor", default="config", help="'config' (the encoder's scaling_factor), 'auto' "
                                                              "(1/std of the first shard) or a number")
    lat.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    lat.add_argument("--local", action="store_true", help="encode in this process instead of Ray tasks")
    lat.add_argument("--address", help="Ray cluster to join (default: start a local instance)")
    d.set_defaults(handler=_cmd_prepare)
    e = dsub.add_parser("init-encoder", help="save a small randomly initialised AutoencoderKL (no weights needed)")
    e.add_argument("--out", required=True, help="new directory (diffusers layout)")
    e.add_argument("--latent-channels", type=int, default=4)
    e.add_argument("--channels", default="32,64", help="stage widths; n stages downsample by 2^(n-1)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(handler=_cmd_init_encoder)


def _cmd_prepare(args) -> int:
    if args.encoder:
        return _prepare_latents(args)
    from orchestrator.infra.data_io import from_image_folder, from_npz, write_dataset
    from orchestrator.infra.storage import open_storage
    from trainers.config import DataConfig
    from trainers.data import builtin_dataset
    if args.source in ("digits", "shapes"):
        data = builtin_dataset(DataConfig(name=args.source, image_size=args.image_size, num_classes=args.num_classes,
                                          num_samples=args.num_samples, seed=args.seed))
    elif args.source.endswith(".npz"):
        data = from_npz(args.source)
    else:
        data = from_image_folder(args.source)
    shard_size = 1024 if args.shard_size is None else args.shard_size
    if shard_size < 1:
        raise UserError("--shard-size: must be >= 1")
    storage = open_storage(args.out, args.endpoint, fail_fast=True)
    storage.check()
    meta = write_dataset(data, open_storage(args.out, args.endpoint), shard_size=shard_size)
    print(f"wrote {meta['count']} images ({meta['image_size']}x{meta['image_size']}x{meta['channels']}, "
          f"{meta['num_classes']} classes) in {len(meta['shards'])} shard(s) to {storage.uri}")
    return 0


def _prepare_latents(args) -> int:
    from orchestrator.infra.encoder import load_payload
    from orchestrator.jobs.encode import EncodeRequest, describe, encode_source, open_source
    req = EncodeRequest(args.source, args.out, args.encoder, resolution=args.resolution, flip=args.flip,
                        store=args.store, scale_factor=args.scale_factor,
                        shard_size=256 if args.shard_size is None else args.shard_size, batch_size=args.batch_size,
                        seed=args.seed, local=args.local, address=args.address, endpoint=args.endpoint)
    payload = load_payload(req.encoder)
    src = open_source(args.source, image_size=args.image_size, num_classes=args.num_classes,
                      num_samples=args.num_samples, seed=args.seed, endpoint=args.endpoint)
    manifest = encode_source(req, payload, src)
    from orchestrator.infra.storage import open_storage
    print(describe(manifest, open_storage(args.out, args.endpoint).uri))
    return 0


def _cmd_init_encoder(args) -> int:
    from orchestrator.infra.encoder import init_encoder
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise UserError(f"--channels: {args.channels!r} is not a comma-separated list of integers") from None
    sha = init_encoder(args.out, latent_channels=args.latent_channels, channels=channels, seed=args.seed)
    print(f"wrote a random AutoencoderKL ({len(channels)} stages, x{2 ** (len(channels) - 1)} downsampling, "
          f"{args.latent_channels} latent channels) to {args.out}; sha256 {sha[:12]}…")
    return 0
