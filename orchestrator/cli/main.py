"""``denoiselab`` command line. Every user mistake ends in one line on stderr and exit code 2;
``--debug`` shows the traceback instead.

The command table is assembled from this package's command modules (each has ``register(sub)``)
and from the entry-point group ``denoiselab.commands``, through which layers above the
orchestrator (``search``) contribute their commands without the orchestrator importing them.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from typing import Callable, Optional

from trainers.errors import UserError

__all__ = ["main", "build_parser", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "denoiselab.commands"


def _builtin() -> list[Callable]:
    from orchestrator.cli import cost, data, doctor, experts, intervals, jobs, launch, review, samples, train
    return [train.register, experts.register, data.register, samples.register, review.register, intervals.register,
            cost.register, doctor.register, jobs.register, launch.register]


def _version() -> str:
    try:
        return metadata.version("denoiselab")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


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
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also accepted after the command)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines on the console "
                        "(also accepted after the command)")
    parser.add_argument("--version", action="version", version=f"denoiselab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _builtin() + _contributed():
        register(sub)
    return parser


def _global_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """``--debug`` / ``--verbose`` anywhere before a ``--`` count as global flags."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = {a for a in argv[:end] if a in ("--debug", "--verbose")}
    return [a for i, a in enumerate(argv) if i >= end or a not in flags], flags


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv, flags = _global_flags(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    args.debug = args.debug or "--debug" in flags
    args.verbose = args.verbose or "--verbose" in flags
    if args.verbose:
        os.environ["DENOISELAB_VERBOSE"] = "1"
    from orchestrator.infra.session import quiet_ray_console
    quiet_ray_console()                                     # before anything imports ray
    import logging
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")    # mlflow sets its own level on import
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if getattr(args, "address", None):                 # a dead cluster: one line in seconds, not minutes
            from orchestrator.infra.session import check_reachable
            check_reachable(args.address)
        return args.handler(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"denoiselab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from orchestrator.infra.session import disconnect_ray
        disconnect_ray()                                    # Ray's log lines end before ours
        print("denoiselab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
