"""The Tune trial: base config + the trial's overrides -> one Ray Train run through the
orchestrator's training driver (docs/platform.md, "Ray Tune, Optuna and ASHA").

* The Train run is named ``<study>-<trial id>``: when Tune restarts a trial (a crashed trial
  driver, or a study resumed after an interrupt), the trial resumes its own run from its latest
  checkpoint in storage, and appends to the same MLflow run.
* Ray Tune's ``TuneReportCallback`` rides on the Train ``RunConfig``: every ``ray.train.report``
  of rank 0 (a checkpoint every ``train.checkpoint_every`` steps) reaches Tune, where ASHA and
  Optuna see it. The study's metric is checked on the first result (``search.tuner``). The
  trial ends by reporting the run's final metrics once more (evaluation metrics included); a
  study without a scheduler whose metric is an evaluation metric (a comparison of arms by
  FD-digits) gets only that final report.
* The MLflow run is a child of the study's parent run (tag ``mlflow.parentRunId``); the parent
  run and the experiment are created once on the Tune driver before any trial starts.
* A MEME expert-set config makes a trial of its own kind: the whole set trains (one Ray Train
  run per expert, concurrently), then the routed set is evaluated and reported once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TrialContext", "run_trial", "trial_run_name"]


@dataclass(frozen=True)
class TrialContext:
    study: str
    base: dict                  # the resolved base run config (plain dict, every default filled in)
    parent_run_id: str          # the study's MLflow parent run
    final_only: bool = False    # report once, at the end (no scheduler acts on the checkpoints' reports)


def trial_run_name(study: str, trial_id: str) -> str:
    return f"{study}-{trial_id}"


def _expert_set_trial(cfg, context: TrialContext) -> dict[str, float]:
    """A MEME set as one trial: its experts train as concurrent Ray Train runs (children of the
    set's MLflow run, itself a child of the study's), then the routed set is evaluated
    (``eval.n`` samples); the result carries the evaluation metrics and the full budget's step."""
    from orchestrator.jobs.evaluation import evaluate_checkpoint
    from orchestrator.jobs.experts import ExpertsRequest, run_experts
    out = run_experts(ExpertsRequest(cfg, parent_run_id=context.parent_run_id, quiet=True))
    metrics = {"step": float(cfg.train.steps)}
    if cfg.eval.n > 0:
        record, _, _ = evaluate_checkpoint(cfg.name, n=cfg.eval.n, steps=cfg.eval.steps, local=True,
                                           storage=cfg.storage.path, endpoint=cfg.storage.endpoint,
                                           tracking_uri=out.tracking_uri)
        metrics.update(record.metrics)
    return metrics


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable (runs in a Tune actor, with Ray already connected)."""
    import ray.tune                                                          # RAY
    from ray.tune.integration.ray_train import TuneReportCallback           # RAY
    from orchestrator.runs.driver import TrainRequest, run_training
    from trainers.config import load_config
    trial_id = ray.tune.get_context().get_trial_id()                         # RAY
    overrides = {**config["overrides"], "name": trial_run_name(context.study, trial_id)}
    cfg = load_config(context.base, overrides)
    if cfg.methods.meme is not None and cfg.methods.meme.expert is None:
        ray.tune.report(_expert_set_trial(cfg, context))                     # RAY: one result, at the end
        return
    callbacks = () if context.final_only else (TuneReportCallback(),)      # RAY: Train -> Tune results
    outcome = run_training(TrainRequest(cfg, parent_run_id=context.parent_run_id, quiet=True,
                                        train_callbacks=callbacks))
    final = {k: float(v) for k, v in outcome.metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if final:
        # RAY: the final result once more, from this function: a trial restarted after its run had
        # already finished trains nothing and forwards nothing, yet must end with its final step
        ray.tune.report(final)
