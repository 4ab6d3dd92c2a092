"""``denoiselab review``: runs from any MLflow store as a table or JSON, and comparison plots.

A row per run: denoiselab run name (tag ``denoiselab.run_name``), method plan (params
``plan.*``), steps reached (last ``loss`` step) of ``train.steps``, images/s and loss (latest),
the best evaluation metric over the run (lowest ``fd_<set>`` / ``fid``, see
``orchestrator/jobs/evaluation.py``) and the checkpoint URI (tag ``checkpoint.final`` or
``checkpoint.latest``).

``--compare RUN RUN …`` writes PNGs (matplotlib, Agg canvas, no pyplot state) and logs them as
artifacts ``review/*.png`` of every compared run: loss curves, evaluation metric curves, the
per-interval loss (``interval/loss_k``, ANT's task losses) as a heatmap over steps × intervals,
curriculum stage (``curriculum/stage``), ANT-UW weights (``uw/weight_k``), NashMTL weights
(``nash/alpha_k``), the runs' final sample grids and every summary a method wrote
(``summaries/*.json``, e.g. DMP's gate usage per timestep range). A figure is written
only when some compared run has its metrics.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

from orchestrator.jobs.evaluation import is_eval_metric
from orchestrator.infra.tracking import RUN_NAME_TAG, TrackingError, check_tracking, resolve_tracking_uri
from trainers.errors import UserError

__all__ = ["open_store", "list_runs", "format_table", "find_runs", "compare_runs", "PLOTS"]

PLOTS = ("loss", "metrics", "interval_loss", "curriculum", "uw_weights", "nash_weights", "samples")
_INDEXED = re.compile(r"^(.*?)(\d+)$")


def open_store(tracking_uri: Optional[str]):
    """(MlflowClient, uri) for ``--tracking-uri`` (else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        raise TrackingError(f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}; "
                            f"pass --tracking-uri sqlite:///path/to/mlflow.db or http://server:5000")
    check_tracking(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")     # grids are downloaded quietly
    from mlflow.tracking import MlflowClient
    return MlflowClient(uri), uri


def _experiments(client, name: Optional[str]) -> dict[str, str]:
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    if name is None:
        return exps
    chosen = {i: n for i, n in exps.items() if n == name}
    if not chosen:
        raise UserError(f"--experiment: no experiment named {name!r}; there are: {', '.join(sorted(exps.values()))}")
    return chosen


def _run_name(run) -> str:
    tags = run.data.tags
    return tags.get(RUN_NAME_TAG) or tags.get("mlflow.runName") or run.info.run_id


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _best_eval(client, run) -> Optional[dict]:
    keys = sorted(k for k in run.data.metrics if is_eval_metric(k) and (k.startswith("fd_") or k == "fid"))
    if not keys:
        return None
    key = "fid" if "fid" in keys else keys[0]
    step, value = min(_history(client, run.info.run_id, key), key=lambda sv: (sv[1], sv[0]))
    return {"metric": key, "value": value, "step": step}


def _row(client, run, experiment: str) -> dict:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    loss = _history(client, run.info.run_id, "loss") if "loss" in metrics else []
    return {"run_name": _run_name(run), "run_id": run.info.run_id, "experiment": experiment,
            "status": run.info.status, "plan": params.get("plan.methods", "-"),
            "plan_detail": {k.removeprefix("plan."): v for k, v in params.items() if k.startswith("plan.")},
            "steps": loss[-1][0] if loss else None, "target_steps": int(params["train.steps"])
            if params.get("train.steps", "").isdigit() else None,
            "images_per_s": metrics.get("images_per_s"), "loss": metrics.get("loss"),
            "best_eval": _best_eval(client, run),
            "eval": {k: v for k, v in metrics.items() if is_eval_metric(k)},
            "checkpoint": tags.get("checkpoint.final") or tags.get("checkpoint.latest"),
            "parent_run_id": tags.get("mlflow.parentRunId")}


def list_runs(client, experiment: Optional[str] = None, parent: Optional[str] = None,
              max_results: int = 1000) -> list[dict]:
    """One row per run, newest first; ``parent`` (run id or name) keeps one study's children."""
    exps = _experiments(client, experiment)
    if not exps:
        return []
    flt = ""
    if parent:
        flt = f"tags.`mlflow.parentRunId` = '{find_runs(client, [parent], experiment)[0].info.run_id}'"
    runs = client.search_runs(list(exps), filter_string=flt, order_by=["attributes.start_time DESC"],
                              max_results=max_results)
    return [_row(client, r, exps[r.info.experiment_id]) for r in runs]


def _fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: list[dict]) -> str:
    head = ("run", "plan", "steps", "img/s", "loss", "best eval", "status", "checkpoint")
    body = []
    for r in rows:
        steps = f"{_fmt(r['steps'], 'd')}/{_fmt(r['target_steps'], 'd')}"
        best = r["best_eval"]
        best_s = f"{best['metric']}={best['value']:.4g}@{best['step']}" if best else "-"
        body.append((r["run_name"], r["plan"], steps, _fmt(r["images_per_s"], ".0f"), _fmt(r["loss"]), best_s,
                     r["status"], r["checkpoint"] or "-"))
    if not body:
        return "no runs"
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def find_runs(client, refs: list[str], experiment: Optional[str] = None) -> list:
    """Runs by denoiselab run name, MLflow run name or run id (newest match wins)."""
    exps = list(_experiments(client, experiment))
    out = []
    for ref in refs:
        found = []
        for flt in (f"tags.`{RUN_NAME_TAG}` = '{ref}'", f"attributes.run_name = '{ref}'"):
            found = client.search_runs(exps, filter_string=flt, order_by=["attributes.start_time DESC"],
                                       max_results=1) if exps else []
            if found:
                break
        if not found and re.fullmatch(r"[0-9a-f]{32}", ref):
            found = [client.get_run(ref)]
        if not found:
            raise UserError(f"--compare: no run named {ref!r} in this store; list runs with `denoiselab review`")
        out.append(found[0])
    return out


def _indexed(run, prefix: str) -> list[tuple[int, str]]:
    """Metric keys ``<prefix><k>`` of a run, sorted by k."""
    keys = []
    for key in run.data.metrics:
        m = _INDEXED.match(key)
        if key.startswith(prefix) and m and m.group(1) == prefix:
            keys.append((int(m.group(2)), key))
    return sorted(keys)


def _summary_plots(client, runs: list, names: list[str]) -> list[tuple[str, object]]:
    """One figure per summary a method wrote (e.g. DMP's gate usage), a panel per run."""
    from orchestrator.review import plots as rp
    per_run = [(name, rp.run_summaries(client, run)) for run, name in zip(runs, names)]
    keys = sorted({key for _, summaries in per_run for key in summaries})
    return [(key, rp.summary_heatmaps([(name, s[key]) for name, s in per_run if key in s])) for key in keys]


def compare_runs(client, refs: list[str], out_dir: str, experiment: Optional[str] = None,
                 log: bool = True) -> dict:
    """Write the comparison PNGs to ``out_dir``; log them to each run; return rows and paths."""
    from orchestrator.review import plots as rp
    if len(refs) < 1:
        raise UserError("--compare: name at least one run")
    runs = find_runs(client, refs, experiment)
    os.makedirs(out_dir, exist_ok=True)
    names = [_run_name(r) for r in runs]
    hist = {}
    for run in runs:
        keys = [k for k in run.data.metrics if k == "loss" or is_eval_metric(k) or k == "curriculum/stage"
                or k.startswith(("interval/loss_", "uw/weight_", "nash/alpha_"))]
        hist[run.info.run_id] = {k: _history(client, run.info.run_id, k) for k in keys}
    series = [(name, hist[r.info.run_id]) for name, r in zip(names, runs)]
    plots: dict[str, str] = {}
    for plot, fig in (("loss", rp.curves(series, ["loss"], "training loss", log_y=True)),
                      ("metrics", rp.curves(series, sorted({k for _, h in series for k in h if is_eval_metric(k)}),
                                            "evaluation metrics")),
                      ("interval_loss", rp.interval_heatmaps(series, [_indexed(r, "interval/loss_") for r in runs])),
                      ("curriculum", rp.curves(series, ["curriculum/stage"], "curriculum stage", step_plot=True)),
                      ("uw_weights", rp.families(series, [_indexed(r, "uw/weight_") for r in runs], "ANT-UW weights")),
                      ("nash_weights", rp.families(series, [_indexed(r, "nash/alpha_") for r in runs],
                                                   "ANT-NashMTL weights")),
                      ("samples", rp.sample_grids(client, runs, names)),
                      *_summary_plots(client, runs, names)):
        if fig is not None:
            path = os.path.join(out_dir, f"{plot}.png")
            fig.savefig(path, dpi=100)
            plots[plot] = path
    if log:
        for run in runs:
            for path in plots.values():
                client.log_artifact(run.info.run_id, path, artifact_path="review")
    rows = [_row(client, r, client.get_experiment(r.info.experiment_id).name) for r in runs]
    return {"runs": rows, "plots": plots, "logged_to": [r.info.run_id for r in runs] if log else []}

