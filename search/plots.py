"""Plots of a study for its MLflow parent run (matplotlib, Agg backend): the objective over
trials, parameter importances (``optuna.importance``; skipped with a note when there are too few
trials), and parallel coordinates of the parameters coloured by the objective.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

__all__ = ["objective_plot", "importance_plot", "parallel_plot", "write_plots"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def objective_plot(records, metric: str, mode: str, path: Path) -> Path:
    """Metric per trial (in trial order): full-budget trials filled, early-stopped hollow; the
    running best of the full-budget trials as a step line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r.optuna_number if r.optuna_number is not None else i for i, r in enumerate(records)]
    full = [(i, r.value) for i, r in zip(xs, records) if r.status == "finished" and r.value is not None]
    stopped = [(i, r.value) for i, r in zip(xs, records) if r.status == "stopped" and r.value is not None]
    if full:
        ax.scatter(*zip(*full), color="C0", label="full budget", zorder=3)
        best, line = None, []
        for i, v in full:
            best = v if best is None else (min(best, v) if mode == "min" else max(best, v))
            line.append((i, best))
        ax.step(*zip(*line), where="post", color="C0", alpha=0.6, label="best so far")
    if stopped:
        ax.scatter(*zip(*stopped), facecolors="none", edgecolors="C3", label="stopped early (partial budget)",
                   zorder=3)
    ax.set_xlabel("trial (Optuna number)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(metric)
    ax.set_title(f"objective over trials ({mode})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def importance_plot(optuna_study, path: Path) -> tuple[Optional[Path], str]:
    """fANOVA importances over the full-budget trials (all complete trials if fewer than 3)."""
    import optuna
    complete = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    full = [t for t in complete if not t.user_attrs.get("stopped_early", False)]
    chosen, which = (full, "full-budget trials") if len(full) >= 3 else (complete, "all complete trials")
    try:
        sub = optuna.create_study(direction=optuna_study.direction)
        sub.add_trials(chosen)
        importances = optuna.importance.get_param_importances(sub)
    except Exception as err:  # noqa: BLE001 - too few trials, a single parameter, constant values
        return None, f"parameter importances skipped: {str(err).splitlines()[0][:200]}"
    if not importances:
        return None, "parameter importances skipped: no parameter varied"
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 1.2 + 0.4 * len(names))))
    ax.barh(names, [importances[n] for n in names], color="C2")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(f"parameter importances ({len(chosen)} {which})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, f"parameter importances from {len(chosen)} {which}"


def _axis(values: list, log: bool) -> tuple[list[Optional[float]], str]:
    """Values of one parameter -> positions in [0, 1] (None where the trial has no such parameter)
    and a tick label: ``low..high`` for numbers, ``a|b|c`` (bottom to top) for categories."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        f = (lambda v: math.log10(v)) if log and min(present) > 0 else float
        lo, hi = f(min(present)), f(max(present))
        span = (hi - lo) or 1.0
        pos = [None if v is None else (f(v) - lo) / span for v in values]
        return pos, f"{min(present):.3g}..{max(present):.3g}"
    cats = sorted({str(v) for v in present})
    step = 1.0 / max(len(cats) - 1, 1)
    return [None if v is None else cats.index(str(v)) * step for v in values], "|".join(cats)[:40]


def parallel_plot(optuna_study, metric: str, path: Path) -> Optional[Path]:
    import optuna
    trials = [t for t in optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if t.value is not None]
    names = sorted({p for t in trials for p in t.params})
    if not trials or not names:
        return None
    plt = _pyplot()
    columns, labels = [], []
    for name in names:
        dist = next(t.distributions[name] for t in trials if name in t.distributions)
        pos, ticks = _axis([t.params.get(name) for t in trials], bool(getattr(dist, "log", False)))
        columns.append(pos)
        labels.append(f"{name}\n{ticks}")
    values = [t.value for t in trials]
    objective, _ = _axis(values, False)
    columns.append(objective)
    labels.append(metric)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns)), 4.5))
    cmap = plt.get_cmap("viridis_r")
    for j, trial in enumerate(trials):
        pts = [(i, col[j]) for i, col in enumerate(columns) if col[j] is not None]
        style = "--" if trial.user_attrs.get("stopped_early") else "-"
        ax.plot(*zip(*pts), style, color=cmap(objective[j]), alpha=0.8, marker="o", markersize=3)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yticks([])
    ax.set_title("parallel coordinates (colour: objective; dashed: stopped early)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(records, optuna_study, metric: str, mode: str, out_dir: Path) -> tuple[list[Path], list[str]]:
    """All three plots under ``out_dir/plots``; returns the files and notes on what was skipped."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    files, notes = [objective_plot(records, metric, mode, plots / "objective.png")], []
    imp, note = importance_plot(optuna_study, plots / "importances.png")
    notes.append(note)
    if imp is not None:
        files.append(imp)
    par = parallel_plot(optuna_study, metric, plots / "parallel_coordinates.png")
    if par is not None:
        files.append(par)
    else:
        notes.append("parallel coordinates skipped: no varied parameter")
    return files, notes
