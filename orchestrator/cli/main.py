"""``denoiselab`` command line. Every user mistake ends in one line on stderr and exit code 2;
``--debug`` shows the traceback instead.

The command table is assembled from this package's command modules (each has ``register(sub)``)
and from the entry-point group ``denoiselab.commands``, through which layers above the
orchestrator (``search``) contribute their commands without the orchestrator importing them.
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import Callable, Optional

from trainers.errors import UserError

__all__ = ["main", "build_parser", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "denoiselab.commands"


def _builtin() -> list[Callable]:
    from orchestrator.cli import cost, data, experts, intervals, review, samples, train
    return [train.register, experts.register, data.register, samples.register, review.register, intervals.register,
            cost.register]


def _contributed() -> list[Callable]:
    out = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            out.append(ep.load())
        except ImportError as err:                 # a layer that is not installed: its commands are absent
            print(f"denoiselab: warning: command {ep.name!r} unavailable ({err})", file=sys.stderr)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denoiselab", description="Diffusion training as many denoising tasks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _builtin() + _contributed():
        register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"denoiselab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("denoiselab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
