"""``denoiselab data prepare``: a Parquet dataset from a built-in set, an .npz or an image folder."""
from __future__ import annotations

from trainers.errors import UserError

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="write a Parquet dataset from digits, shapes, an .npz or an image folder")
    d.add_argument("source", help="digits | shapes | path/to/file.npz | path/to/image_folder")
    d.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    d.add_argument("--shard-size", type=int, default=1024)
    d.add_argument("--image-size", type=int, default=16, help="shapes only")
    d.add_argument("--num-classes", type=int, default=4, help="shapes only")
    d.add_argument("--num-samples", type=int, default=4096, help="shapes only")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--endpoint", help="S3-compatible endpoint for --out")
    d.set_defaults(handler=_cmd_data)


def _cmd_data(args) -> int:
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
    if args.shard_size < 1:
        raise UserError("--shard-size: must be >= 1")
    storage = open_storage(args.out, args.endpoint, fail_fast=True)
    storage.check()
    meta = write_dataset(data, open_storage(args.out, args.endpoint), shard_size=args.shard_size)
    print(f"wrote {meta['count']} images ({meta['image_size']}x{meta['image_size']}x{meta['channels']}, "
          f"{meta['num_classes']} classes) in {len(meta['shards'])} shard(s) to {storage.uri}")
    return 0
