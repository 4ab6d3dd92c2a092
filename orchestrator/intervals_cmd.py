"""``denoiselab intervals``: the ANT interval DP from the command line, with an optional plot."""
from __future__ import annotations

from trainers.build import load_affinity
from trainers.diffusion.schedule import snr
from trainers.errors import ConfigError
from trainers.methods.intervals import resolve_intervals

__all__ = ["run_intervals", "plot_intervals"]


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
