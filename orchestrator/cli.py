"""``denoiselab`` command line. Every user mistake ends in one line on stderr and exit code 2;
``--debug`` shows the traceback instead."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from trainers.errors import UserError

__all__ = ["main", "build_parser"]


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.steps=200 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denoiselab", description="Diffusion training as many denoising tasks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run on Ray Train (or in-process with --local)")
    _add_config_args(p, required=False)
    p.add_argument("--address", help="Ray cluster: auto, ray://host:10001 or host:port (default: start local Ray)")
    p.add_argument("--resume", metavar="RUN", help="resume this run by name, with its stored config")
    p.add_argument("--restart", action="store_true", help="start a new run (new name) from the same config")
    p.add_argument("--register", metavar="MODEL", help="register the final checkpoint as an MLflow model")
    p.add_argument("--local", action="store_true", help="train in this process without Ray or MLflow")

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

    p = sub.add_parser("sample", help="draw samples from a checkpoint or run")
    p.add_argument("checkpoint", help="run name, checkpoint directory or state.pt")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", default="samples.png", help="PNG grid path")
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=["ddpm", "ddim"])
    p.add_argument("--guidance", type=float)
    p.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default="./runs", help="where run names are looked up")
    p.add_argument("--endpoint")

    p = sub.add_parser("intervals", help="cluster timesteps into intervals (ANT DP)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--rule", choices=["uniform", "timestep", "snr", "log-snr", "affinity"], default="uniform")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--min-width", type=int, default=1)
    p.add_argument("--artifact", help="task-affinity artifact (tas.npz) for --rule affinity")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write a PNG of SNR(t) with the boundaries")
    return parser


def _cmd_train(args) -> int:
    from orchestrator.config_io import load_run_config
    cfg = load_run_config(args.config, args.overrides)
    if args.local:
        from orchestrator.local import train_local
        train_local(cfg)
        return 0
    from orchestrator.driver import TrainRequest, config_for_resume, run_training
    if args.resume:
        cfg = config_for_resume(args.resume, cfg.replace(name=args.resume))
    outcome = run_training(TrainRequest(cfg, address=args.address, restart=args.restart, register=args.register))
    _print_summary(outcome)
    return 0


def _print_summary(o) -> None:
    ui = f"mlflow ui --backend-store-uri {o.tracking_uri}" if not o.tracking_uri.startswith("http") else o.tracking_uri
    grid = f"{o.storage_uri}/denoiselab/artifacts/samples/final.png"
    print(f"\nrun         {o.run_name}{' (resumed)' if o.resumed else ''}\n"
          f"mlflow run  {o.run_id}  ->  {ui}\n"
          f"checkpoint  {o.checkpoint_uri}\n"
          f"samples     {grid}")
    for key in ("loss", "fd_digits", "fd_shapes"):
        if key in o.metrics:
            print(f"{key:<11} {o.metrics[key]:.4f}")


def _cmd_data(args) -> int:
    from orchestrator.data_io import from_image_folder, from_npz, write_dataset
    from orchestrator.storage import open_storage
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


def _cmd_sample(args) -> int:
    from orchestrator.sampling import sample_local
    path = sample_local(args.checkpoint, n=args.n, out=args.out, steps=args.steps, sampler=args.sampler,
                        guidance=args.guidance, use_ema=not args.raw, seed=args.seed, storage=args.storage,
                        endpoint=args.endpoint)
    print(f"wrote {args.n} samples to {path}")
    return 0


def _cmd_intervals(args) -> int:
    from orchestrator.intervals_cmd import run_intervals
    result = run_intervals(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['rule']} intervals on the {result['schedule']} schedule (T={result['steps']}, "
              f"cost {result['cost']:.4g}):")
        for lo, hi in result["intervals"]:
            print(f"  [{lo}, {hi})")
    return 0


COMMANDS = {"train": _cmd_train, "data": _cmd_data, "sample": _cmd_sample, "intervals": _cmd_intervals}


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        if args.debug:
            raise
        print(f"denoiselab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("denoiselab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
