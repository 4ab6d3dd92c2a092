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
