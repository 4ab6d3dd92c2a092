"""The figure of ``denoiselab transfer``: the task-affinity heatmap with interval boundaries, and
the per-interval loss of the multi-task model next to the single-interval models' (Agg canvas)."""
from __future__ import annotations

from typing import Optional

import numpy as np
from matplotlib.figure import Figure

from orchestrator.review.plots import figure_grid, finish_axis

__all__ = ["transfer_figure"]


def _boundaries(ax, bounds: list[int], **style) -> None:
    for b in bounds[1:-1]:
        ax.axvline(b, **style)
        ax.axhline(b, **style)


def transfer_figure(gaps: list[dict], tas: Optional[np.ndarray], run_bounds: list[int],
                    tas_bounds: Optional[list[int]], title: str) -> Figure:
    panels = 2 if tas is not None else 1
    fig, axes = figure_grid(panels, title, width=6.0, height=5.0)
    if tas is not None:
        ax = axes[0]
        image = ax.imshow(tas, origin="lower", cmap="viridis", vmin=-1.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8, label="gradient cosine (task affinity)")
        _boundaries(ax, run_bounds, color="white", lw=1.2, label="run's intervals")
        if tas_bounds:
            _boundaries(ax, tas_bounds, color="red", lw=1.0, ls="--")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("timestep t")
        ax.set_title("task affinity; white: run's intervals" + (", red: affinity DP" if tas_bounds else ""))
    ax = axes[-1]
    k = np.arange(len(gaps))
    ax.bar(k - 0.2, [g["multi"] for g in gaps], width=0.4, label="multi-task run")
    ax.bar(k + 0.2, [g["single"] for g in gaps], width=0.4, label="single-interval model")
    for g in gaps:
        top = max(g["multi"], g["single"])
        ax.annotate(f"{100 * g['relative_gap']:+.1f} %", (g["interval"], top), ha="center", va="bottom", fontsize=8,
                    color="C3" if g["gap"] > 0 else "C2")
    ax.set_xticks(k, [f"{i}" for i in k])
    ax.set_ylabel("denoising loss (ε-MSE + vb)")
    finish_axis(ax, "gap > 0 (red): negative transfer on that interval", xlabel="interval (0 = least noise)",
                log_y=True, legend_size=8, grid_axis="y")
    return fig
