"""After the tuner: one record per trial, early stops marked in MLflow and Optuna, the
leaderboard, the best trial (among full-budget trials unless asked otherwise), its config as a
ready-to-run experiment YAML, and its checkpoint registered when asked.

ASHA-stopped trials reach Optuna as COMPLETE with a partial-budget value (docs/platform.md,
"Ray Tune, Optuna and ASHA"): they are marked ``stopped_early`` (Optuna user attribute, MLflow tag) and left out of the
choice of the best trial unless ``--include-stopped``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["TrialRecord", "collect_trials", "mark_child_runs", "fail_orphans", "pick_best", "leaderboard_text",
           "write_outputs", "register_best"]

_STATUS = {"TERMINATED": "finished", "ERROR": "error"}
LABELS = ("arm", "seed")                 # trial labels from the arm and seed spaces (search.spaces)


@dataclass
class TrialRecord:
    trial_id: str
    run_name: str
    status: str                          # finished | stopped | error | unfinished
    value: Optional[float]
    step: Optional[int]
    overrides: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    optuna_number: Optional[int] = None
    run_id: Optional[str] = None
    checkpoint: Optional[str] = None
    error: Optional[str] = None

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped"


def _value(result: dict, metric: str) -> Optional[float]:
    value = result.get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def collect_trials(trials, study, budget_steps: int, optuna_study) -> list[TrialRecord]:
    """Tune trials (+ the Optuna study, to map numbers) -> records in trial order."""
    from search.objective import trial_run_name
    numbers = {t.user_attrs.get("tune_trial_id"): t.number for t in optuna_study.get_trials(deepcopy=False)}
    out = []
    for trial in trials:
        result = trial.last_result or {}
        step = result.get("step")
        status = _STATUS.get(trial.status, "unfinished")
        if status == "finished" and (step is None or step < budget_steps):
            status = "stopped"
        config = trial.config or {}
        error = None
        if status == "error":
            error = _error_line(trial)
        out.append(TrialRecord(trial.trial_id, trial_run_name(study.name, trial.trial_id), status,
                               _value(result, study.metric), int(step) if step is not None else None,
                               dict(config.get("overrides", {})),
                               {k: v for k, v in config.items() if k != "overrides"},
                               numbers.get(trial.trial_id), error=error))
    out.sort(key=lambda r: (r.optuna_number is None, r.optuna_number or 0, r.trial_id))   # the order trials began
    return out


def _error_line(trial) -> str:
    try:
        err = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may be gone; the status says enough
        err = None
    lines = str(err).strip().splitlines() if err else []
    return lines[-1][:300] if lines else "error"


def mark_child_runs(records: list[TrialRecord], tracking_uri: str, experiment_id: str, parent_id: str) -> int:
    """Find each trial's MLflow run; tag it (trial id, stopped_early) and close runs ASHA cut off.
    Children of the study that belong to no trial (a trial begun just before a hard kill, which
    the resumed Tune state does not know) are tagged ``orphaned`` and closed; returns their count."""
    from mlflow.tracking import MlflowClient
    from orchestrator.infra.tracking import RUN_NAME_TAG
    client = MlflowClient(tracking_uri)
    children = {r.data.tags.get(RUN_NAME_TAG): r for r in client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)}
    orphans = [run for name, run in children.items() if name not in {rec.run_name for rec in records}]
    for run in orphans:
        client.set_tag(run.info.run_id, "search.status", "orphaned")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
    for rec in records:
        run = children.get(rec.run_name)
        if run is None:
            continue
        rec.run_id = run.info.run_id
        rec.checkpoint = run.data.tags.get("checkpoint.final") or run.data.tags.get("checkpoint.latest")
        client.set_tag(rec.run_id, "search.trial_id", rec.trial_id)
        client.set_tag(rec.run_id, "search.status", rec.status)
        client.set_tag(rec.run_id, "search.stopped_early", str(rec.stopped_early).lower())
        if rec.optuna_number is not None:
            client.set_tag(rec.run_id, "search.optuna_trial", str(rec.optuna_number))
        for label in LABELS:                                   # arm / seed of a comparison study
            if label in rec.params:
                client.set_tag(rec.run_id, f"search.{label}", str(rec.params[label]))
        if rec.status == "stopped" or (run.info.status == "RUNNING" and rec.status != "unfinished"):
            # a trial ASHA stopped ended as planned (its driver saw the stop as an error or never returned)
            client.set_terminated(rec.run_id, "FAILED" if rec.status == "error" else "FINISHED")
    return len(orphans)


def fail_orphans(optuna_study, records: list[TrialRecord]) -> int:
    """Optuna trials still RUNNING after the study ended belong to no Tune trial (asked just before
    a hard kill, never checkpointed by Tune): mark them FAIL so the study is clean."""
    import optuna
    live = {r.trial_id for r in records if r.status == "unfinished"}
    count = 0
    for t in optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("tune_trial_id") not in live:
            optuna_study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            count += 1
    return count


def pick_best(records: list[TrialRecord], mode: str, include_stopped: bool) -> Optional[TrialRecord]:
    ok = ("finished", "stopped") if include_stopped else ("finished",)
    candidates = [r for r in records if r.status in ok and r.value is not None]
    if not candidates:
        return None
    return (min if mode == "min" else max)(candidates, key=lambda r: r.value)


def _ranked(records: list[TrialRecord], mode: str) -> list[TrialRecord]:
    scored = [r for r in records if r.value is not None]
    scored.sort(key=lambda r: (r.status != "finished", r.value if mode == "min" else -r.value))
    return scored + [r for r in records if r.value is None]


def _short(overrides: dict[str, Any]) -> str:
    items = []
    for key, value in overrides.items():
        key = key.removeprefix("methods.")
        items.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(items) or "(base config)"


def _described(rec: TrialRecord) -> str:
    """An arm trial by its labels (its overrides are the arm's), any other by its overrides."""
    labels = [f"{k}={rec.params[k]}" for k in LABELS if k in rec.params]
    return ", ".join(labels) if "arm" in rec.params else ", ".join(labels + [_short(rec.overrides)])


def leaderboard_text(records: list[TrialRecord], metric: str, mode: str, top: int = 10) -> str:
    """Full-budget trials first (ranked by the metric), then trials stopped early, then the rest."""
    lines = [f"{'rank':>4}  {'trial':<14} {metric:>10}  {'steps':>6}  {'status':<9} overrides"]
    for i, rec in enumerate(_ranked(records, mode)[:top], 1):
        value = f"{rec.value:.4f}" if rec.value is not None else "-"
        lines.append(f"{i:>4}  {rec.trial_id:<14} {value:>10}  {rec.step or '-':>6}  {rec.status:<9} "
                     f"{_described(rec)}")
    return "\n".join(lines)


def best_config_yaml(base: dict, best: TrialRecord, study_name: str, metric: str) -> str:
    import yaml
    from trainers.config import load_config
    cfg = load_config(base, {**best.overrides, "name": f"{study_name}-best"})
    head = (f"# Best trial {best.trial_id} of study {study_name}: {metric}={best.value:.6g} at step {best.step}.\n"
            f"# Overrides: {_short(best.overrides)}\n# Run it: denoiselab train <this file>\n")
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def write_outputs(out_dir: Path, records: list[TrialRecord], best: Optional[TrialRecord], base: dict,
                  study, board: str) -> dict[str, Path]:
    """leaderboard.{md,json} and best.yaml in the study's output directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"leaderboard_md": out_dir / "leaderboard.md", "leaderboard_json": out_dir / "leaderboard.json"}
    paths["leaderboard_md"].write_text(f"# Study {study.name}: {study.mode} {study.metric}\n\n```\n{board}\n```\n")
    body = {"study": study.name, "metric": study.metric, "mode": study.mode,
            "best": best.trial_id if best else None,
            "trials": [{**asdict(r), "stopped_early": r.stopped_early} for r in records]}
    paths["leaderboard_json"].write_text(json.dumps(body, indent=1, default=str))
    if best is not None:
        paths["best_yaml"] = out_dir / "best.yaml"
        paths["best_yaml"].write_text(best_config_yaml(base, best, study.name, study.metric))
    return paths


def register_best(tracking_uri: str, model_name: str, best: TrialRecord, config_yaml: str,
                  alias: str = "best") -> str:
    """Register the best trial's checkpoint as a model version and point ``alias`` at it."""
    from mlflow.tracking import MlflowClient
    from orchestrator.runs.driver import register_checkpoint
    from trainers.errors import UserError
    if best.run_id is None or not best.checkpoint:
        raise UserError(f"--register: the best trial {best.trial_id} has no checkpoint in MLflow "
                        f"(tag checkpoint.final); nothing to register")
    client = MlflowClient(tracking_uri)
    version = register_checkpoint(client, model_name, best.run_id, best.checkpoint, config_yaml)
    client.set_registered_model_alias(model_name, alias, version)
    return version
