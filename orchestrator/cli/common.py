"""Arguments shared by several commands."""
from __future__ import annotations

import argparse

__all__ = ["add_config_args", "add_eval_runtime_args"]


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.steps=200 (repeatable)")


def add_eval_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="Ray tasks to split the seeds over (default: 1 per 256 samples, "
                   "at most 8)")
    p.add_argument("--local", action="store_true", help="sample in this process, without Ray")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (default: if the "
                   "cluster has GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--storage", default="./runs", help="where run names are looked up")
    p.add_argument("--endpoint", help="S3-compatible endpoint for s3:// paths")
