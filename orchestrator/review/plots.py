"""Figures for ``denoiselab review --compare`` (matplotlib ``Figure`` + Agg canvas, no pyplot state).

Each builder takes ``series = [(run name, {metric key: [(step, value), ...]}), ...]`` and returns a
``Figure`` or None when no compared run has the metrics it draws.
"""
from __future__ import annotations

import math
import tempfile
from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["curves", "interval_heatmaps", "families", "sample_grids", "summary_heatmaps", "figure_png", "run_summaries",
           "figure_grid", "finish_axis"]

Series = list[tuple[str, dict[str, list[tuple[int, float]]]]]


def figure_grid(panels: int, title: str, width: float = 6.0, height: float = 3.6) -> tuple[Figure, list]:
    """A figure of `panels` axes, at most 3 per row, with its Agg canvas."""
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes[:panels])


def curves(series: Series, keys: list[str], title: str, log_y: bool = False,
           step_plot: bool = False) -> Optional[Figure]:
    """One panel per metric key, one line per run."""
    keys = [k for k in keys if any(h.get(k) for _, h in series)]
    if not keys:
        return None
    fig, axes = figure_grid(len(keys), title)
    for ax, key in zip(axes, keys):
        for name, hist in series:
            points = hist.get(key) or []
            if not points:
                continue
            steps, values = zip(*points)
            draw = ax.step if step_plot else ax.plot
            kwargs = {"where": "post"} if step_plot else {"marker": "o" if len(points) < 12 else None}
            draw(steps, values, label=name, **kwargs)
        log = log_y and all(v > 0 for _, h in series for _, v in h.get(key, []))
        finish_axis(ax, key, xlabel="step", log_y=log, legend_size=8)
    return fig


def finish_axis(ax, title: str, xlabel: Optional[str] = None, log_y: bool = False, legend_size: Optional[int] = None,
                grid_axis: str = "both") -> None:
    """Title, x label, log scale, light grid and legend of one panel."""
    if log_y:
        ax.set_yscale("log")
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis=grid_axis)
    if legend_size:
        ax.legend(fontsize=legend_size)


def interval_heatmaps(series: Series, indexed: list[list[tuple[int, str]]]) -> Optional[Figure]:
    """Per run: log10 of ``interval/loss_k`` over steps (x) × intervals (y)."""
    panels = [(name, hist, keys) for (name, hist), keys in zip(series, indexed) if keys]
    if not panels:
        return None
    fig, axes = figure_grid(len(panels), "per-interval loss (log10), steps × intervals")
    for ax, (name, hist, keys) in zip(axes, panels):
        steps = sorted({s for _, key in keys for s, _ in hist.get(key, [])})
        col = {s: j for j, s in enumerate(steps)}
        grid = np.full((len(keys), len(steps)), np.nan)
        for row, (_, key) in enumerate(keys):
            for s, v in hist.get(key, []):
                grid[row, col[s]] = math.log10(v) if v > 0 else np.nan
        half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
        extent = (steps[0] - half, steps[-1] + half, -0.5, len(keys) - 0.5)          # cells centred on steps
        image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                          extent=extent)
        fig.colorbar(image, ax=ax, label="log10 loss")
        ax.set_yticks(range(len(keys)), [str(k) for k, _ in keys])
        ax.set_xlabel("step")
        ax.set_ylabel("interval (0 = lowest t)")
        ax.set_title(name)
    return fig


def families(series: Series, indexed: list[list[tuple[int, str]]], title: str) -> Optional[Figure]:
    """Per run: one line per index k of a metric family (``uw/weight_k``, ``nash/alpha_k``)."""
    panels = [(name, hist, keys) for (name, hist), keys in zip(series, indexed) if keys]
    if not panels:
        return None
    fig, axes = figure_grid(len(panels), title)
    for ax, (name, hist, keys) in zip(axes, panels):
        for k, key in keys:
            points = hist.get(key) or []
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=f"interval {k}")
        finish_axis(ax, name, xlabel="step", legend_size=8)
    return fig


def _final_grid(client, run, tmp: str) -> Optional[np.ndarray]:
    from PIL import Image
    try:
        path = client.download_artifacts(run.info.run_id, "samples/final.png", tmp)
    except Exception:  # noqa: BLE001 - a run without a grid (still running, failed) gets no panel
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def sample_grids(client, runs: list, names: list[str]) -> Optional[Figure]:
    """The runs' final sample grids (MLflow artifact ``samples/final.png``) side by side."""
    with tempfile.TemporaryDirectory() as tmp:
        grids = [(name, _final_grid(client, run, tmp)) for run, name in zip(runs, names)]
    grids = [(name, g) for name, g in grids if g is not None]
    if not grids:
        return None
    fig, axes = figure_grid(len(grids), "final samples (EMA)", width=4.0, height=4.2)
    for ax, (name, grid) in zip(axes, grids):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    return fig


def summary_heatmaps(panels: list[tuple[str, dict]]) -> Optional[Figure]:
    """``kind: heatmap`` summaries a method writes (``summaries/<name>.json``), one panel per run."""
    panels = [(name, s) for name, s in panels if s.get("kind") == "heatmap" and s.get("values")]
    if not panels:
        return None
    fig, axes = figure_grid(len(panels), panels[0][1].get("title", "summary"))
    for ax, (name, summary) in zip(axes, panels):
        values = np.asarray(summary["values"], dtype=float)
        image = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest", cmap="magma")
        fig.colorbar(image, ax=ax)
        rows = summary.get("rows") or []
        if rows:
            ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel(summary.get("xlabel", ""))
        ax.set_ylabel(summary.get("ylabel", ""))
        ax.set_title(name, fontsize=9)
    return fig


def figure_png(fig: Figure) -> bytes:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def run_summaries(client, run) -> dict[str, dict]:
    """The ``summaries/*.json`` artifacts of one run, by name."""
    import json
    import os
    out = {}
    try:
        listed = client.list_artifacts(run.info.run_id, "summaries")
    except Exception:  # noqa: BLE001 - a store without the folder
        return out
    with tempfile.TemporaryDirectory() as tmp:
        for item in listed:
            if item.path.endswith(".json"):
                path = client.download_artifacts(run.info.run_id, item.path, tmp)
                with open(path) as fh:
                    out[os.path.basename(item.path)[:-5]] = json.load(fh)
    return out
