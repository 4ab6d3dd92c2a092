"""Figures of ``denoiselab review --studies`` (matplotlib ``Figure`` + Agg canvas): each arm's
evaluation metrics as bars with ± one standard deviation over seeds, and its per-interval loss."""
from __future__ import annotations

from typing import Optional

from matplotlib.figure import Figure

from orchestrator.review.plots import figure_grid, finish_axis

__all__ = ["arm_bars", "arm_interval_losses"]


def arm_bars(summaries, keys: list[str]) -> Optional[Figure]:
    """One panel per metric: a bar per arm (mean), error bar ± std, the seeds' count in the label."""
    keys = [k for k in keys if any(k in s.mean for s in summaries)]
    if not keys:
        return None
    fig, axes = figure_grid(len(keys), "arms: mean ± std over seeds", width=7.0, height=4.2)
    for ax, key in zip(axes, keys):
        shown = [s for s in summaries if key in s.mean]
        studies = list(dict.fromkeys(s.study for s in summaries))
        ax.bar(range(len(shown)), [s.mean[key] for s in shown], yerr=[s.std[key] for s in shown], capsize=3,
               color=[f"C{studies.index(s.study) % 10}" for s in shown])
        ax.set_xticks(range(len(shown)), [f"{s.arm} ({s.n})" for s in shown], rotation=60, ha="right", fontsize=8)
        finish_axis(ax, key, grid_axis="y")
    return fig


def arm_interval_losses(summaries) -> Optional[Figure]:
    """Per study: each arm's training loss per interval (mean over seeds of the runs' last points)."""
    by_study: dict[str, list] = {}
    for s in summaries:
        if any(k.startswith("interval_loss_") for k in s.mean):
            by_study.setdefault(s.study, []).append(s)
    if not by_study:
        return None
    fig, axes = figure_grid(len(by_study), "per-interval training loss (interval 0 = least noise)")
    for ax, (study, arms) in zip(axes, by_study.items()):
        for s in arms:
            keys = sorted((k for k in s.mean if k.startswith("interval_loss_")), key=lambda k: int(k.rsplit("_", 1)[1]))
            ax.errorbar(range(len(keys)), [s.mean[k] for k in keys], yerr=[s.std[k] for k in keys], marker="o",
                        capsize=2, label=s.arm)
        finish_axis(ax, study, xlabel="interval", log_y=True, legend_size=7)
    return fig
