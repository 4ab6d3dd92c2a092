"""``denoiselab review``: list and compare runs from any MLflow store."""
from __future__ import annotations

import json

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("review", help="list and compare runs from MLflow")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", help="only this experiment")
    p.add_argument("--parent", help="only the child runs of this parent run (a study)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="write comparison plots of these runs")
    p.add_argument("--out", default="review", help="directory for --compare PNGs")
    p.add_argument("--no-log", action="store_true", help="do not log --compare plots to MLflow")
    p.set_defaults(handler=_cmd_review)

    r = sub.add_parser("replay", help="send metrics spooled during a tracking outage into their MLflow run")
    r.add_argument("run", help="run name")
    r.add_argument("--storage", default="./runs", help="storage.path of the run (local directory or s3://)")
    r.add_argument("--endpoint", help="S3-compatible endpoint for s3:// paths")
    r.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    r.set_defaults(handler=_cmd_replay)


def _cmd_review(args) -> int:
    from orchestrator.review.runs import compare_runs, format_table, list_runs, open_store
    client, _ = open_store(args.tracking_uri)
    if args.compare:
        result = compare_runs(client, args.compare, args.out, args.experiment, log=not args.no_log)
        if args.format == "json":
            print(json.dumps(result, default=str))
            return 0
        print(format_table(result["runs"]))
        for name, path in result["plots"].items():
            print(f"  {name:<14}{path}")
        if result["logged_to"]:
            print(f"logged as artifacts review/*.png of {len(result['logged_to'])} run(s)")
        return 0
    rows = list_runs(client, args.experiment, args.parent)
    print(json.dumps(rows, default=str) if args.format == "json" else format_table(rows))
    return 0


def _cmd_replay(args) -> int:
    from orchestrator.infra.storage import StorageError, open_storage
    from orchestrator.infra.tracking import MetricSpool, check_tracking, replay_spool, resolve_tracking_uri
    storage = open_storage(args.storage, args.endpoint)
    if not storage.exists(args.run):
        raise StorageError(f"replay: no run {args.run!r} in {storage.uri}; pass --storage (the run's storage.path)")
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri)
    spool = MetricSpool(storage, args.run)
    files = spool.files()
    sent = replay_spool(spool, uri)
    print(f"{args.run}: {sent} metric points from {len(files)} spool file(s) sent to {uri}")
    return 0
