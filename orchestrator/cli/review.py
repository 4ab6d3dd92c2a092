"""``denoiselab review``: list and compare runs from any MLflow store."""
from __future__ import annotations

import json

from trainers.errors import UserError

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("review", help="list and compare runs from MLflow")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", help="only this experiment")
    p.add_argument("--parent", help="only the child runs of this parent run (a study)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="write comparison plots of these runs")
    p.add_argument("--studies", nargs="+", metavar="STUDY",
                   help="comparison studies (arms x seeds): mean ± std per arm, plots, claims' verdicts")
    p.add_argument("--claims", help="with --studies: a claims YAML (benchmarks/repro/claims.yaml) to judge")
    p.add_argument("--out", default="review", help="directory for --compare PNGs and the --studies report")
    p.add_argument("--no-log", action="store_true", help="do not log --compare plots (--studies report) to MLflow")
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
    if args.claims and not args.studies:
        raise UserError("--claims: judged against --studies; name the comparison studies, e.g. --studies repro-methods")
    if args.studies:
        return _review_studies(client, args)
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


def _review_studies(client, args) -> int:
    from orchestrator.review.arms import collect_arm_runs, format_arms, format_verdicts, judge, load_claims, \
        study_parent, summarize, write_report
    claims = load_claims(args.claims) if args.claims else []          # a bad claims file fails before any query
    parents = {study: study_parent(client, study) for study in args.studies}
    runs = collect_arm_runs(client, parents)
    summaries = summarize(runs)
    verdicts = judge(claims, summaries)
    paths = write_report(args.out, runs, summaries, verdicts)
    if args.format == "json":
        print(paths["json"].read_text())
    else:
        print(format_arms(summaries))
        if verdicts:
            print("\n" + format_verdicts(verdicts))
        print(f"\n{len(runs)} runs, {len(summaries)} arms -> {', '.join(str(p) for p in paths.values())}")
    if not args.no_log:
        for parent in parents.values():
            for path in paths.values():
                client.log_artifact(parent.info.run_id, str(path), artifact_path="review")
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
