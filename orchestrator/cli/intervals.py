"""``denoiselab intervals`` (the ANT interval DP, with an optional plot) and ``denoiselab affinity``
(the task-affinity matrix as a Ray job)."""
from __future__ import annotations

import json

from trainers.build import load_affinity
from trainers.diffusion.schedule import snr
from trainers.errors import ConfigError
from trainers.methods.intervals import resolve_intervals

__all__ = ["register", "run_intervals", "plot_intervals"]


def run_intervals(args) -> dict:
    tas = None
    if args.rule == "affinity":
        if not args.artifact:
            raise ConfigError("--artifact: required with --rule affinity (a tas.npz from `denoiselab affinity`)")
        tas = load_affinity(args.artifact)
        if tas.shape != (args.steps, args.steps):
            raise ConfigError(f"--artifact: matrix is {tas.shape}, expected ({args.steps}, {args.steps}); "
                              f"pass the matching --steps")
    values = snr(args.schedule, args.steps)
    intervals, cost = resolve_intervals(args.rule, args.steps, args.count, snr=values, tas=tas,
                                        min_width=args.min_width)
    result = {"intervals": [list(p) for p in intervals.pairs()], "rule": args.rule, "schedule": args.schedule,
              "steps": args.steps, "count": intervals.num_intervals, "cost": float(cost)}
    if args.plot:
        plot_intervals(values, intervals.pairs(), args.plot, f"{args.rule} intervals, {args.schedule} schedule")
        result["plot"] = args.plot
    return result


def plot_intervals(values, pairs, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    ax.semilogy(range(len(values)), values, color="tab:blue", lw=1.5, label="SNR(t)")
    for lo, _ in pairs[1:]:
        ax.axvline(lo, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("SNR (log scale)")
    ax.set_title(f"{title} ({len(pairs)} intervals)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def register(sub) -> None:
    p = sub.add_parser("intervals", help="cluster timesteps into intervals (ANT DP)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--rule", choices=["uniform", "timestep", "snr", "log-snr", "affinity"], default="uniform")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--min-width", type=int, default=1)
    p.add_argument("--artifact", help="task-affinity artifact (tas.npz) for --rule affinity")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write a PNG of SNR(t) with the boundaries")
    p.set_defaults(handler=_cmd_intervals)

    p = sub.add_parser("affinity", help="ANT task-affinity matrix from checkpoints, as a Ray job")
    p.add_argument("checkpoints", nargs="+", help="run names, checkpoint directories or state.pt files")
    p.add_argument("--out", required=True, help="directory or s3:// prefix for tas.npz")
    p.add_argument("--stride", type=int, default=50, help="timestep grid stride (interpolated to T)")
    p.add_argument("--n", type=int, default=256, help="fixed data subset size")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=4096, help="count-sketch projection size (0 = full gradients)")
    p.add_argument("--count", type=int, default=5, help="intervals for the stored partition")
    p.add_argument("--workers", type=int, default=2, help="Ray tasks the timestep grid is split over")
    p.add_argument("--storage", default="./runs")
    p.add_argument("--endpoint")
    p.add_argument("--address")
    p.add_argument("--tracking-uri", help="also log tas.npz to this MLflow store")
    p.set_defaults(handler=_cmd_affinity)

    p = sub.add_parser("transfer", help="negative-transfer report: per-interval loss of a run vs single-interval "
                                        "models, and the task-affinity heatmap with the run's intervals")
    p.add_argument("run", help="the multi-task run: run name, checkpoint directory or state.pt")
    p.add_argument("--singles", required=True,
                   help="expert set of single-interval models (denoiselab experts, methods.meme.identical: true, "
                        "soft: hard)")
    p.add_argument("--affinity", help="tas.npz from denoiselab affinity (draws the heatmap)")
    p.add_argument("--out", default="transfer", help="directory for transfer.png and transfer.json")
    p.add_argument("--n", type=int, default=512, help="images scored per interval")
    p.add_argument("--storage", default="./runs")
    p.add_argument("--endpoint")
    p.add_argument("--tracking-uri", help="log the report to the run's MLflow run (default: $MLFLOW_TRACKING_URI "
                                          "or sqlite:///mlflow.db when it exists)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_transfer)


def _cmd_intervals(args) -> int:
    result = run_intervals(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['rule']} intervals on the {result['schedule']} schedule (T={result['steps']}, "
              f"cost {result['cost']:.4g}):")
        for lo, hi in result["intervals"]:
            print(f"  [{lo}, {hi})")
    return 0


def _cmd_affinity(args) -> int:
    from orchestrator.jobs.affinity import AffinityRequest, run_affinity
    result = run_affinity(AffinityRequest(tuple(args.checkpoints), args.out, stride=args.stride, num_images=args.n,
                                          batch=args.batch, dim=args.dim, count=args.count, workers=args.workers,
                                          storage=args.storage, endpoint=args.endpoint,
                                          tracking_uri=args.tracking_uri), address=args.address)
    print(json.dumps(result))
    return 0


def _cmd_transfer(args) -> int:
    import os
    from orchestrator.infra.tracking import resolve_tracking_uri
    from orchestrator.jobs.transfer import TransferRequest, run_transfer
    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        uri = None                                   # no store here: the report stays local
    result = run_transfer(TransferRequest(args.run, args.singles, args.out, args.affinity, n=args.n,
                                          storage=args.storage, endpoint=args.endpoint, tracking_uri=uri))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.run} vs single-interval models {args.singles} ({result['images']} images per interval):")
    print(f"  {'interval':<14}{'multi-task':>12}{'single':>12}{'gap':>10}")
    for g, (lo, hi) in zip(result["gaps"], zip(result["intervals"], result["intervals"][1:])):
        print(f"  {f'[{lo}, {hi})':<14}{g['multi']:>12.4f}{g['single']:>12.4f}{100 * g['relative_gap']:>+9.1f}%")
    worse = result["negative_transfer"]
    print(f"negative transfer (run worse than the single-interval model) on intervals: {worse or 'none'}")
    print(f"report: {', '.join(result['outputs'].values())}"
          + (f"; logged as artifacts transfer/ of MLflow run {result['logged_to']}" if result.get("logged_to") else ""))
    return 0
