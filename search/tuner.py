"""The study driver: OptunaSearch (define-by-run, persisted) + ASHA + Train-inside-Tune, with
resume (docs/platform.md, "Ray Tune, Optuna and ASHA").

* Every check that can fail runs before Ray starts a trial: the study and base configs, a random
  sample of the space validated as the driver would, storage, the tracking store.
* Tune state lives in ``<storage.path>/tune/<study>`` (local or ``s3://``); re-running the same
  command finds it (``Tuner.can_restore``) and resumes: finished trials are kept, unfinished ones
  restart and resume their own Train runs from their checkpoints, the Optuna sampler continues
  from the persisted study (sqlite next to the outputs by default, any Optuna storage URL).
* ``max_concurrent_trials`` follows the cluster: floor(GPUs / GPUs per trial) or
  floor(CPUs / CPUs per trial). The trial driver takes no CPU, so a trial needs exactly its workers.
* ASHA counts training steps (the ``step`` every report carries), so a restarted trial keeps its
  place on the rungs; its grace period and rungs are given in reports (checkpoints).
* The study's metric is checked on the first result: Tune refuses a result without it and the
  study stops with one line naming the keys trials do report.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from orchestrator.infra.storage import ENDPOINT_VARS, Storage, open_storage
from orchestrator.infra.tracking import check_tracking, ensure_experiment, find_or_create_run, log_params, \
    resolve_tracking_uri, STUDY_TAG
from search.config import StudyConfig, StudyError, base_run_dict, fingerprint, reports_per_trial
from search.objective import TrialContext, run_trial
from search.spaces import SpaceFunction, grid_of, resolve_space, validate_space
from trainers.configlib import flatten

from ray.tune.search.optuna import OptunaSearch                     # RAY: the base of StudySearch

__all__ = ["MetricNotReported", "PreparedStudy", "StudySearch", "prepare_study", "concurrency_for", "num_trials",
           "parent_run", "make_searcher", "make_scheduler", "run_tuner", "optuna_storage", "STUDY_TAG"]

_GRID_CHECKED = 4096                  # grids up to this many points are checked point by point
_DRIVER_MEMORY = 256 * 2**20          # bytes reserved for each trial's driver (a Tune actor running fit())
_TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id",
              "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
              "iterations_since_restore", "experiment_tag", "checkpoint_path", "config"}


class MetricNotReported(StudyError):
    """The study's metric is missing from what trials report (seen on the first result)."""


class StudySearch(OptunaSearch):
    """OptunaSearch that writes on every Optuna trial its Tune trial id, the steps it trained and
    whether it stopped before the full budget (``stopped_early``: ASHA reports such trials to
    Optuna as COMPLETE with a partial-budget value; docs/platform.md)."""

    def __init__(self, *args: Any, budget_steps: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._budget_steps = budget_steps
        self._reported: dict[str, set[int]] = {}

    def _report_step(self, trial_id: str, result: Optional[dict]) -> None:
        """Optuna's intermediate value at the *training step* of the report (Tune's own searcher
        keys it by Tune iteration, which a resumed trial repeats), once per step."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or not result or self.metric not in result:
            return
        step = int(result.get("step", result.get("training_iteration", 0)))
        seen = self._reported.setdefault(trial_id, set())
        if step not in seen:
            seen.add(step)
            ot_trial.report(float(result[self.metric]), step)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report_step(trial_id, result)

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        if params is not None and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return params

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        self._report_step(trial_id, result)                 # an ASHA-stopped trial's last report too
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials and result and "step" in result:
            try:
                ot_trial.set_user_attr("steps", int(result["step"]))
                ot_trial.set_user_attr("stopped_early", bool(result["step"] < self._budget_steps))
            except Exception:  # noqa: BLE001 - already told (a resumed study); nothing to add
                pass
        super().on_trial_complete(trial_id, result=result, error=error)


@dataclass
class PreparedStudy:
    study: StudyConfig
    base: dict                      # resolved base run config
    space: SpaceFunction
    storage: Storage                # where Train runs and the Tune state live
    tracking_uri: str
    tune_path: str                  # path inside storage.fs
    budget_steps: int
    reports: int
    grid: Optional[dict[str, list]]  # the GridSampler space (grid studies only)

    @property
    def tune_uri(self) -> str:
        return self.storage.uri_of("tune", self.study.name)


def prepare_study(study: StudyConfig, samples: int = 48) -> PreparedStudy:
    """Everything that can fail before Ray starts: configs, space, storage, tracking."""
    base = base_run_dict(study)
    space = SpaceFunction(resolve_space(study.space, study.arms), base, study.arms)
    checked: set[str] = set()
    drawn = validate_space(space, samples=samples, seed=study.seed, checked=checked)
    grid = None
    if study.sampler.kind == "grid":
        grid = grid_of(space.specs, drawn)                    # continuous ranges fail here
        if math.prod(len(v) for v in grid.values()) <= _GRID_CHECKED:
            validate_space(space, grid=grid, checked=checked)  # every point (every arm) checked before Ray starts
    sc = study.scheduler
    if final_only(study) and not base["eval"]["n"]:
        raise StudyError(f"metric: {study.metric} comes from the evaluation at the end of each trial, and the base "
                         f"config has eval.n: 0; set eval.n (e.g. base: {{eval: {{n: 1000}}}})")
    reports = reports_per_trial(base)
    if sc.kind == "asha" and sc.grace_period >= reports:
        raise StudyError(f"scheduler.grace_period: {sc.grace_period} reports leaves nothing to stop: a full trial "
                         f"reports {reports} times (train.steps / train.checkpoint_every); lower it or report "
                         f"more often (train.checkpoint_every)")
    probe = open_storage(base["storage"]["path"], base["storage"]["endpoint"], base["storage"]["region"],
                         fail_fast=True)
    probe.check()
    storage = open_storage(base["storage"]["path"], base["storage"]["endpoint"], base["storage"]["region"])
    tracking_uri = resolve_tracking_uri(base["tracking"]["uri"])
    check_tracking(tracking_uri)
    base["tracking"]["uri"] = tracking_uri                       # trials write to the same store
    if base.get("init_from"):              # the run every trial starts from (a DMP base) must exist now
        from orchestrator.infra.checkpoints import resolve_checkpoint
        resolve_checkpoint(base["init_from"], storage, base["storage"]["endpoint"], base["storage"]["region"])
    _check_fingerprint(study, base, storage)
    return PreparedStudy(study, base, space, storage, tracking_uri, storage.path("tune", study.name),
                         base["train"]["steps"], reports, grid)


def _check_fingerprint(study: StudyConfig, base: dict, storage: Storage) -> None:
    """A resumed study must be the same study: refuse a changed config under an existing name."""
    stamp = study.output_dir / "study.fingerprint"
    current = fingerprint(study, base)
    tune_exists = storage.exists("tune", study.name)
    if stamp.exists() and tune_exists and stamp.read_text().strip() != current:
        raise StudyError(f"name: study {study.name!r} already exists ({storage.uri_of('tune', study.name)}) with "
                         f"a different config; re-run it unchanged to resume, or give this one a new name")
    study.output_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(current + "\n")


def concurrency_for(study: StudyConfig, base: dict, resources: dict[str, float]) -> int:
    """``study.concurrency``, else as many trials as the cluster holds at once (at least 1)."""
    if study.concurrency is not None:
        return min(study.concurrency, study.budget.trials)
    sc = base["scaling"]
    per_worker = {"CPU": sc["cpus_per_worker"], **sc["resources_per_worker"]}
    if sc["use_gpu"]:
        per_worker.setdefault("GPU", 1)
    fits = [int(resources.get(name, 0) // (amount * sc["num_workers"]))
            for name, amount in per_worker.items() if amount > 0]
    return max(1, min([study.budget.trials, *fits]))


def optuna_storage(url: str):
    """An Optuna storage from a URL: ``journal:///path.log`` or any RDB URL (sqlite, postgresql…)."""
    import optuna
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:").removeprefix("//")))
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as err:  # noqa: BLE001 - bad URL, driver missing, server down
        first = str(err).splitlines()[0][:200]
        raise StudyError(f"storage: cannot open the Optuna storage {url!r} ({first}); use sqlite:///path.db, "
                         f"postgresql://..., or journal:///path.log") from None


def _sampler(prep: PreparedStudy):
    import optuna
    s, seed = prep.study.sampler, prep.study.seed
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.kind == "grid":
        return optuna.samplers.GridSampler(prep.grid, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                          # group=True is experimental in Optuna
        return optuna.samplers.TPESampler(seed=seed, multivariate=s.multivariate, group=s.multivariate,
                                          n_startup_trials=s.startup_trials, constant_liar=True)


def make_scheduler(prep: PreparedStudy):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # RAY
    sc, study = prep.study.scheduler, prep.study
    if sc.kind == "none":
        return FIFOScheduler()
    every = prep.base["train"]["checkpoint_every"]
    max_t = min(sc.max_t or prep.reports, prep.reports) * every
    return ASHAScheduler(time_attr="step", metric=study.metric, mode=study.mode, max_t=max(max_t, 1),
                         grace_period=sc.grace_period * every, reduction_factor=sc.reduction_factor,
                         stop_last_trials=False)


def make_searcher(prep: PreparedStudy, storage=None) -> StudySearch:
    """OptunaSearch over the study's define-by-run space, persisted in the study's Optuna storage."""
    study = prep.study
    return StudySearch(space=prep.space, metric=study.metric, mode=study.mode, sampler=_sampler(prep),
                       study_name=study.name, storage=storage or optuna_storage(study.optuna_storage),
                       budget_steps=prep.budget_steps)


def num_trials(prep: PreparedStudy) -> int:
    """``budget.trials``; a grid never runs more trials than it has points."""
    if prep.study.sampler.kind != "grid":
        return prep.study.budget.trials
    size = 1
    for values in prep.grid.values():
        size *= len(values)
    return min(prep.study.budget.trials, size)


def parent_run(prep: PreparedStudy) -> tuple[str, bool]:
    """The study's MLflow parent run (experiment created here, once, before any trial)."""
    exp = ensure_experiment(prep.tracking_uri, prep.base["tracking"]["experiment"])
    tags = {STUDY_TAG: prep.study.name, "denoiselab.kind": "study", "denoiselab.tune_path": prep.tune_uri}
    run_id, resumed = find_or_create_run(prep.tracking_uri, exp, f"study-{prep.study.name}", tags)
    params = {f"study.{k}": v for k, v in flatten(prep.study.to_dict()).items() if not k.startswith("space")}
    params.update({f"space.{name}": ", ".join(f"{p}={spec}" for p, spec in specs.items())
                   for name, specs in prep.space.specs.items()})
    log_params(prep.tracking_uri, run_id, params)
    return run_id, resumed


def final_only(study: StudyConfig) -> bool:
    """Trials report once, at the end, when nothing acts on their checkpoints' reports (no ASHA)
    and the metric exists only then (an evaluation metric of the final checkpoint: fd_digits…)."""
    from orchestrator.jobs.evaluation import is_eval_metric
    return study.scheduler.kind == "none" and is_eval_metric(study.metric)


def _trainable(prep: PreparedStudy, parent_id: str):
    from ray import tune                                                   # RAY
    context = TrialContext(prep.study.name, prep.base, parent_id, final_only=final_only(prep.study))
    # RAY: the trial driver holds no CPU (its Train workers hold theirs); Tune needs a non-empty bundle
    resources = {"CPU": 0, "memory": _DRIVER_MEMORY}
    return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)


def _keep_credentials_out_of_tune() -> None:
    """Tune copies the driver's AWS credentials into every trial's runtime environment
    (``ray/tune/execution/class_cache.py``, ``ENV_VARS_TO_PROPAGATE``), and Ray writes runtime
    environments, values included, to ``runtime_env_agent.log``. denoiselab never sends
    credentials through Ray (``orchestrator/infra/session.py``): trials inherit them from the
    local instance's environment, cluster nodes have their own."""
    from ray.tune.execution import class_cache                             # RAY: module-level set, read per call
    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in class_cache.ENV_VARS_TO_PROPAGATE
                                         if not v.startswith("AWS_") or v in ENDPOINT_VARS}


def _tuner(prep: PreparedStudy, parent_id: str, concurrency: int):
    from ray import tune                                                   # RAY
    _keep_credentials_out_of_tune()
    study, fs = prep.study, (prep.storage.fs if prep.storage.is_remote else None)
    trainable = _trainable(prep, parent_id)
    if tune.Tuner.can_restore(prep.tune_path, storage_filesystem=fs):
        return tune.Tuner.restore(prep.tune_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False, storage_filesystem=fs), True
    tune_config = tune.TuneConfig(search_alg=make_searcher(prep), scheduler=make_scheduler(prep),
                                  num_samples=num_trials(prep), max_concurrent_trials=concurrency,
                                  time_budget_s=study.budget.time_s, reuse_actors=False)
    run_config = tune.RunConfig(name=study.name, storage_path=prep.storage.path("tune"), storage_filesystem=fs,
                                failure_config=tune.FailureConfig(max_failures=study.max_failures),
                                verbose=1 if os.environ.get("DENOISELAB_VERBOSE") else 0)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config), False


def run_tuner(prep: PreparedStudy, parent_id: str, concurrency: int, quiet: bool = False):
    """Fit (or resume) the study; returns Tune's trials (``ExperimentAnalysis.trials``), the seconds
    it ran and whether it resumed an earlier run of the study."""
    from ray.tune import ExperimentAnalysis                                # RAY
    tuner, resumed = _tuner(prep, parent_id, concurrency)
    if not quiet:
        study = prep.study
        sched = (f"ASHA (grace {study.scheduler.grace_period}, rf {study.scheduler.reduction_factor}, of "
                 f"{prep.reports} reports)" if study.scheduler.kind == "asha" else "no early stopping")
        print(f"denoiselab: {'resuming' if resumed else 'starting'} study {study.name}: {num_trials(prep)} trials "
              f"of {prep.budget_steps} steps, {concurrency} at a time, {study.sampler.kind} sampler, {sched}, "
              f"{study.mode} {study.metric}\n  tune state  {prep.tune_uri}\n  optuna      {study.optuna_storage}",
              file=sys.stderr)
    started = time.monotonic()
    try:
        tuner.fit()
    except Exception as err:  # noqa: BLE001 - a missing metric becomes one line
        missing = _missing_metric(err, prep.study.metric)
        if missing is not None:
            raise missing from None
        raise
    fs = prep.storage.fs if prep.storage.is_remote else None
    trials = ExperimentAnalysis(prep.tune_path, storage_filesystem=fs).trials
    return trials, time.monotonic() - started, resumed


def _missing_metric(err: BaseException, metric: str) -> Optional[MetricNotReported]:
    seen: set[int] = set()
    stack: list[Optional[BaseException]] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text = str(e)
        if "did not include the specified metric" in text:
            keys = sorted(set(re.findall(r"'([^']+)':", text.partition("Result:")[2])) - _TUNE_KEYS)
            shown = ", ".join(k for k in keys if "/" not in k)[:300] or "nothing"
            return MetricNotReported(f"metric: trials do not report {metric!r}; they report {shown}; "
                                     f"set metric to one of those (e.g. loss)")
        stack.extend([e.__cause__, e.__context__])
    return None
