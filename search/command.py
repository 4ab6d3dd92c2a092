"""``denoiselab search STUDY.yaml``: prepare, run (or resume) the study, then report.

The order matters: every check runs before Ray starts; the MLflow experiment and the study's
parent run are created on this driver before any trial starts (parallel trials never race on
them; docs/platform.md, "MLflow"); after the tuner, trials are marked, the leaderboard is printed and
written, the plots and the best config go to the parent run, and the best checkpoint is
registered when asked. Ctrl-C (or a kill) leaves a study that the same command resumes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from search.config import StudyConfig

__all__ = ["SearchRequest", "StudyOutcome", "run_search"]


@dataclass(frozen=True)
class SearchRequest:
    study: StudyConfig
    address: Optional[str] = None          # None: start a local Ray; "auto", "ray://host:10001", "host:6379"
    register: Optional[str] = None         # MLflow model name for the best checkpoint
    include_stopped: bool = False          # let trials stopped early compete for "best"
    quiet: bool = False


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    records: list
    best: Optional[object]
    leaderboard: str
    outputs: dict[str, Path] = field(default_factory=dict)
    resumed: bool = False
    seconds: float = 0.0
    registered_version: Optional[str] = None


def run_search(req: SearchRequest) -> StudyOutcome:
    import ray                                                             # RAY
    from mlflow.tracking import MlflowClient
    from orchestrator.infra.session import connect_ray
    from search.tuner import concurrency_for, parent_run, prepare_study, run_tuner
    prep = prepare_study(req.study)
    connect_ray(req.address)
    concurrency = concurrency_for(req.study, prep.base, ray.cluster_resources())
    parent_id, _ = parent_run(prep)
    client = MlflowClient(prep.tracking_uri)
    client.update_run(parent_id, status="RUNNING")
    _log_study_file(client, parent_id, req.study)
    try:
        trials, seconds, resumed = run_tuner(prep, parent_id, concurrency, quiet=req.quiet)
    except KeyboardInterrupt:
        client.set_terminated(parent_id, "KILLED")
        raise
    except Exception:
        client.set_terminated(parent_id, "FAILED")
        raise
    return _report(req, prep, trials, parent_id, client, seconds, resumed)


def _log_study_file(client, parent_id: str, study: StudyConfig) -> None:
    """The resolved study config, as ``study.yaml`` in the outputs and on the parent run."""
    import yaml
    path = study.output_dir / "study.yaml"
    path.write_text(yaml.safe_dump(study.to_dict(), sort_keys=False))
    client.log_artifact(parent_id, str(path))


def _report(req: SearchRequest, prep, trials, parent_id: str, client, seconds: float,
            resumed: bool) -> StudyOutcome:
    import optuna
    from search.plots import write_plots
    from search.results import (collect_trials, fail_orphans, leaderboard_text, mark_child_runs, pick_best,
                                register_best, write_outputs)
    from search.tuner import optuna_storage
    study = req.study
    optuna_study = optuna.load_study(study_name=study.name, storage=optuna_storage(study.optuna_storage))
    records = collect_trials(trials, study, prep.budget_steps, optuna_study)
    experiment_id = client.get_run(parent_id).info.experiment_id
    orphan_runs = mark_child_runs(records, prep.tracking_uri, experiment_id, parent_id)
    time_spent = study.budget.time_s is not None and seconds >= 0.98 * study.budget.time_s
    if any(r.status == "unfinished" for r in records) and not time_spent:
        client.set_terminated(parent_id, "KILLED")
        raise KeyboardInterrupt("study interrupted")
    orphans = fail_orphans(optuna_study, records) + orphan_runs
    best = pick_best(records, study.mode, req.include_stopped)
    board = leaderboard_text(records, study.metric, study.mode)
    outputs = write_outputs(study.output_dir, records, best, prep.base, study, board)
    plots, notes = write_plots(records, optuna_study, study.metric, study.mode, study.output_dir)
    for path in list(outputs.values()):
        client.log_artifact(parent_id, str(path))
    for path in plots:
        client.log_artifact(parent_id, str(path), artifact_path="plots")
    _log_summary(client, parent_id, records, best, orphans)
    outcome = StudyOutcome(study.name, parent_id, prep.tracking_uri, records, best, board, outputs, resumed, seconds)
    if req.register and best is not None:
        outcome.registered_version = register_best(prep.tracking_uri, req.register, best,
                                                   outputs["best_yaml"].read_text())
    client.set_terminated(parent_id, "FINISHED")
    if not req.quiet:
        _print(outcome, study, notes, req)
    return outcome


def _log_summary(client, parent_id: str, records, best, orphans: int) -> None:
    counts = {s: sum(r.status == s for r in records) for s in ("finished", "stopped", "error")}
    for status, n in counts.items():
        client.log_metric(parent_id, f"trials_{status}", n)
    if best is not None:
        client.log_metric(parent_id, "best_value", best.value)
        client.set_tag(parent_id, "search.best_trial", best.trial_id)
        if best.run_id:
            client.set_tag(parent_id, "search.best_run_id", best.run_id)
    if orphans:
        client.set_tag(parent_id, "search.orphans", str(orphans))   # Optuna trials + MLflow runs of no trial


def _print(outcome: StudyOutcome, study, notes: list[str], req: SearchRequest) -> None:
    out = study.output_dir
    lines = [f"\nstudy       {study.name}{' (resumed)' if outcome.resumed else ''}",
             f"leaderboard ({study.mode} {study.metric}; full-budget trials first)", outcome.leaderboard, ""]
    if outcome.best is None:
        lines.append("best        none reached the full budget; --include-stopped lets trials stopped early compete")
    else:
        lines.append(f"best        {outcome.best.trial_id}  {study.metric}={outcome.best.value:.4f}  ->  "
                     f"denoiselab train {outcome.outputs['best_yaml']}")
    if outcome.registered_version:
        lines.append(f"registered  {req.register} version {outcome.registered_version} (alias best)")
    ui = (outcome.tracking_uri if outcome.tracking_uri.startswith("http")
          else f"mlflow ui --backend-store-uri {outcome.tracking_uri}")
    lines += [f"mlflow      parent run {outcome.parent_run_id}  ->  {ui}",
              f"optuna      optuna-dashboard {study.optuna_storage}",
              f"outputs     {out}"]
    lines += [f"note        {n}" for n in notes if "skipped" in n]
    print("\n".join(lines))
