"""``denoiselab train``: a run on Ray Train (or in this process with ``--local``) and its summary."""
from __future__ import annotations

from orchestrator.cli.common import add_config_args

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("train", help="train a run on Ray Train (or in-process with --local)")
    add_config_args(p, required=False)
    p.add_argument("--address", help="Ray cluster: auto, ray://host:10001 or host:port (default: start local Ray)")
    p.add_argument("--resume", metavar="RUN", help="resume this run by name, with its stored config")
    p.add_argument("--restart", action="store_true", help="start a new run (new name) from the same config")
    p.add_argument("--register", metavar="MODEL", help="register the final checkpoint as an MLflow model")
    p.add_argument("--local", action="store_true", help="train in this process without Ray or MLflow")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args) -> int:
    from orchestrator.infra.config_io import load_run_config
    cfg = load_run_config(args.config, args.overrides)
    if args.local:
        from orchestrator.runs.local import train_local
        train_local(cfg)
        return 0
    from orchestrator.runs.driver import TrainRequest, config_for_resume, run_training
    if args.resume:
        _check_resume_overrides(args.resume, args.overrides)
        cfg = config_for_resume(args.resume, cfg.replace(name=args.resume))
    outcome = run_training(TrainRequest(cfg, address=args.address, restart=args.restart, register=args.register))
    _print_summary(outcome, cfg.storage.endpoint)
    return 0


WHERE_IT_RUNS = ("storage.", "tracking.", "scaling.")


def _check_resume_overrides(run: str, overrides: list[str]) -> None:
    """``--resume`` continues a run with its stored config; only where it runs may change."""
    changed = [o.partition("=")[0].strip() for o in overrides if not o.strip().startswith(WHERE_IT_RUNS)]
    if changed:
        from trainers.errors import ConfigError
        raise ConfigError(f"--resume {run}: continues the run with its stored config, so --set {changed[0]} cannot "
                          f"apply (only storage.*, tracking.* and scaling.* may change); drop it, or start a new "
                          f"run from the changed config with --restart")


def _print_summary(o, endpoint=None) -> None:
    """What the run left behind; only paths that exist are printed."""
    from orchestrator.infra.storage import open_storage
    ui = f"mlflow ui --backend-store-uri {o.tracking_uri}" if not o.tracking_uri.startswith("http") else o.tracking_uri
    lines = [f"\nrun         {o.run_name}{' (resumed)' if o.resumed else ''}",
             f"mlflow run  {o.run_id}  ->  {ui}"]
    if o.checkpoint_uri:
        lines.append(f"checkpoint  {o.checkpoint_uri}")
    run_dir = open_storage(o.storage_uri, endpoint)
    grid = ("denoiselab", "artifacts", "samples", "final.png")
    if run_dir.exists(*grid):
        lines.append(f"samples     {run_dir.uri_of(*grid)}")
    print("\n".join(lines))
    for key in ("loss", "fd_digits", "fd_shapes", "fid", "is"):
        if key in o.metrics:
            print(f"{key:<11} {o.metrics[key]:.4f}")
    t = getattr(o, "timings", None) or {}
    if t:
        print(f"time        {t['total_s']:.0f} s: Ray {t['ray_s']:.1f} s, Train workers {t['workers_s']:.1f} s, "
              f"setup {t['setup_s']:.1f} s, training {t['train_s']:.1f} s, final evaluation {t['eval_s']:.1f} s")
