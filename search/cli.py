"""``denoiselab search``: contributed to the orchestrator's command line through the entry-point
group ``denoiselab.commands`` (pyproject.toml), so the orchestrator never imports ``search``."""
from __future__ import annotations

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("search", help="run (or resume) a Ray Tune + Optuna study of training runs")
    p.add_argument("study", help="study YAML, e.g. search/studies/smoke.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="study field (budget.trials=4) or run-config override (train.lr=0.001); repeatable")
    p.add_argument("--address", help="Ray cluster: auto, ray://host:10001 or host:port (default: start local Ray)")
    p.add_argument("--register", metavar="MODEL", help="register the best trial's checkpoint as an MLflow model")
    p.add_argument("--include-stopped", action="store_true",
                   help="let trials stopped early by ASHA compete for the best (default: full-budget trials only)")
    p.set_defaults(handler=_cmd_search)


def _cmd_search(args) -> int:
    from search.command import SearchRequest, run_search
    from search.config import load_study
    run_search(SearchRequest(load_study(args.study, args.overrides), address=args.address, register=args.register,
                             include_stopped=args.include_stopped))
    return 0
