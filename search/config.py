"""The study configuration: one frozen dataclass per section, loaded strictly.

A study YAML (``search/studies/*.yaml``) names a base experiment, the metric, the budget, the
scheduler, the sampler and the search space::

    name: intervals
    experiment: ../../orchestrator/experiments/quickstart.yaml   # relative to this file, or cwd
    base: {sample: {n: 0}}             # inline run config merged over the experiment
    overrides: {train.lr: 0.001}       # dotted overrides applied to every trial
    metric: loss                       # any key the training driver reports (checked on the first result)
    mode: min
    budget: {trials: 24, steps: 3000, time_s: 7200}
    concurrency: null                  # null: from the cluster's resources and each trial's needs
    scheduler: {kind: asha, grace_period: 2, reduction_factor: 3}    # or `scheduler: none`
    sampler: {kind: tpe}               # tpe (multivariate) | random | grid
    seed: 0
    space: {ant: {count: [2, 8]}, dtr: {}}
    arms: {vanilla: {}, dtr: {methods.dtr: {active_ratio: 0.8}}}   # named override bundles: space {arm: {}}

Unknown keys are errors (``trainers.configlib.from_dict``); every mistake raises
:class:`StudyError` with one line naming the field and the fix.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

from trainers.config import RunConfig, load_config
from trainers.configlib import apply_overrides, from_dict, parse_value, set_dotted, to_dict
from trainers.errors import ConfigError

__all__ = ["StudyError", "BudgetConfig", "SchedulerConfig", "SamplerConfig", "StudyConfig", "load_study",
           "study_from_dict", "base_run_dict", "reports_per_trial", "fingerprint"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StudyError(ConfigError):
    """The study config is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class BudgetConfig:
    trials: int = 8                     # Tune num_samples
    steps: Optional[int] = None         # train.steps of every trial (the full budget); default: the base's
    time_s: Optional[float] = None      # wall-clock budget of the whole study (Tune time_budget_s)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise StudyError("budget.trials: must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise StudyError("budget.steps: must be >= 1 (the train.steps of every trial)")
        if self.time_s is not None and self.time_s <= 0:
            raise StudyError("budget.time_s: must be > 0 seconds, or null for no time limit")


@dataclass(frozen=True)
class SchedulerConfig:
    """ASHA (the stopping variant, Ray's ``ASHAScheduler``); all lengths in reports (checkpoints)."""
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = 1               # reports a trial always gets before it can be stopped
    reduction_factor: int = 3           # keep the best 1/rf at every rung
    max_t: Optional[int] = None         # rungs lie below this report; default: the reports of a full trial

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise StudyError("scheduler.grace_period: must be >= 1 report")
        if self.reduction_factor < 2:
            raise StudyError("scheduler.reduction_factor: must be >= 2 (ASHA keeps 1/rf of the trials per rung)")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise StudyError("scheduler.max_t: must be >= scheduler.grace_period")


@dataclass(frozen=True)
class SamplerConfig:
    kind: Literal["tpe", "random", "grid"] = "tpe"
    multivariate: bool = True           # TPE: model parameters jointly (Optuna 5 default)
    startup_trials: int = 10            # TPE: random trials before the model is used

    def __post_init__(self) -> None:
        if self.startup_trials < 0:
            raise StudyError("sampler.startup_trials: must be >= 0")


@dataclass(frozen=True)
class StudyConfig:
    name: str
    experiment: Optional[str] = None    # experiment YAML (absolute once loaded)
    base: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    concurrency: Optional[int] = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    storage: Optional[str] = None       # Optuna storage URL; default sqlite:///<output>/optuna.db
    output: Optional[str] = None        # local outputs; default ./runs/studies/<name>
    max_failures: int = 1               # restarts of a crashed trial (it resumes its own Train run)
    space: dict[str, Any] = field(default_factory=dict)
    arms: dict[str, Any] = field(default_factory=dict)   # name -> {dotted.key: value}; the `arm` space picks one

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise StudyError(f"name: {self.name!r} must be 1-64 letters, digits, '_', '-' or '.' "
                             f"(it names runs and directories)")
        if not self.metric.strip():
            raise StudyError("metric: empty; name a metric the training driver reports, e.g. loss")
        if self.concurrency is not None and self.concurrency < 1:
            raise StudyError("concurrency: must be >= 1, or null to follow the cluster's resources")
        if self.max_failures < 0:
            raise StudyError("max_failures: must be >= 0")
        if not self.space:
            raise StudyError("space: empty; select at least one space, e.g. space: {optim: {}, ant: {}}")
        for arm, bundle in self.arms.items():
            if not _NAME.match(str(arm)):
                raise StudyError(f"arms.{arm}: an arm name is 1-64 letters, digits, '_', '-' or '.'")
            if bundle is not None and not isinstance(bundle, dict):
                raise StudyError(f"arms.{arm}: expected a mapping of run-config overrides, e.g. "
                                 f"{{methods.dtr: {{active_ratio: 0.8}}}} (or {{}} for the base config)")

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"./runs/studies/{self.name}").expanduser().resolve()

    @property
    def optuna_storage(self) -> str:
        return self.storage or f"sqlite:///{self.output_dir / 'optuna.db'}"

    def to_dict(self) -> dict:
        return to_dict(self)


def _normalize(data: dict) -> dict:
    """Shorthands: ``scheduler: none`` / ``sampler: random`` mean ``{kind: ...}``."""
    data = dict(data)
    for key in ("scheduler", "sampler"):
        if isinstance(data.get(key), str):
            data[key] = {"kind": data[key]}
        elif data.get(key) is None and key in data:
            data[key] = {"kind": "none"} if key == "scheduler" else {}
    return data


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` items: study fields (``budget.trials=2``, ``storage=postgresql://…``) vs run-config
    overrides (``train.lr=1e-3``, ``storage.path=s3://…``)."""
    study_keys = {f.name for f in fields(StudyConfig)}
    run_keys = {f.name for f in fields(RunConfig)}
    study, run = [], []
    for item in items:
        key = item.partition("=")[0].strip()
        if "=" not in item:
            raise StudyError(f"--set {item!r}: expected key=value, e.g. budget.trials=4 or train.lr=0.001")
        head = key.split(".")[0]
        if head in study_keys and not (head in run_keys and "." in key):   # storage=URL vs storage.path=...
            study.append(item)
        elif head in run_keys:
            run.append(item)
        else:
            raise StudyError(f"--set {key}: {head!r} is neither a study field ({', '.join(sorted(study_keys))}) "
                             f"nor a run-config section ({', '.join(sorted(run_keys))})")
    return study, run


def study_from_dict(data: dict, origin: Optional[Path] = None, sets: Optional[list[str]] = None) -> StudyConfig:
    """Raw mapping (+ ``--set`` items) -> validated :class:`StudyConfig`; the experiment path
    becomes absolute (relative paths are tried next to ``origin`` first, then in the cwd)."""
    data = _normalize(data or {})
    study_sets, run_sets = _split_overrides(list(sets or []))
    for item in study_sets:
        key, _, text = item.partition("=")
        data = set_dotted(data, key.strip(), parse_value(text))
    data = _normalize(data)
    if run_sets:
        data["overrides"] = {**(data.get("overrides") or {}),
                             **{k.strip(): parse_value(v) for k, _, v in (s.partition("=") for s in run_sets)}}
    if "name" not in data and origin is not None:
        data["name"] = origin.stem
    if isinstance(data.get("overrides"), list):          # also accept ["a.b=c", ...]
        data["overrides"] = {k.strip(): parse_value(v) for k, _, v in (s.partition("=") for s in data["overrides"])}
    if data.get("experiment"):
        data["experiment"] = str(_find(data["experiment"], origin))
    try:
        return from_dict(StudyConfig, data)
    except StudyError:
        raise
    except ConfigError as err:
        raise StudyError(str(err)) from None


def _find(path: str, origin: Optional[Path]) -> Path:
    candidates = [Path(path).expanduser()]
    if origin is not None and not Path(path).is_absolute():
        candidates.insert(0, origin.parent / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    raise StudyError(f"experiment: {path} not found (looked in {', '.join(str(c) for c in candidates)})")


def load_study(path: str, sets: Optional[list[str]] = None) -> StudyConfig:
    from orchestrator.infra.config_io import read_yaml
    p = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as err:
        raise StudyError(str(err)) from None
    try:
        return study_from_dict(data, p, sets)
    except StudyError as err:
        raise StudyError(f"{path}: {err}") from None


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def base_run_dict(study: StudyConfig) -> dict:
    """The run config every trial starts from (experiment + base + overrides + budget), resolved
    and validated, as a plain dict with every default filled in."""
    from orchestrator.infra.config_io import read_yaml
    data = read_yaml(study.experiment) if study.experiment else {}
    data = _merge(data, study.base)
    data.pop("name", None)                          # every trial gets its own name
    overrides = dict(study.overrides)
    if study.budget.steps is not None:
        overrides["train.steps"] = study.budget.steps
    try:
        cfg = load_config(apply_overrides(data, overrides))
    except ConfigError as err:
        raise StudyError(f"base config: {err}") from None
    return _absolute_paths(cfg.to_dict())


def _absolute_paths(base: dict) -> dict:
    """Trials run in Tune's trial directories (another cwd, maybe another node): no relative paths."""
    def absolute(path: Optional[str]) -> Optional[str]:
        if not path or "://" in path:
            return path
        return str(Path(path).expanduser().resolve())
    base["storage"]["path"] = absolute(base["storage"]["path"])
    base["data"]["path"] = absolute(base["data"]["path"])
    base["intervals"]["artifact"] = absolute(base["intervals"]["artifact"])
    init = base.get("init_from")
    if init and ("/" in init or init.startswith(".")):
        base["init_from"] = absolute(init)
    return base


def reports_per_trial(base: dict) -> int:
    """How many times a full trial reports (a checkpoint every ``checkpoint_every`` and at the end)."""
    return math.ceil(base["train"]["steps"] / base["train"]["checkpoint_every"])


def fingerprint(study: StudyConfig, base: dict) -> str:
    """What must not change between an interrupted study and its resumption."""
    body = {"study": {k: v for k, v in study.to_dict().items() if k not in ("concurrency",)}, "base": base}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]
