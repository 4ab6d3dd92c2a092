"""Define-by-run search spaces that return dotted run-config overrides.

One function per method (or concern) draws its parameters from an Optuna trial and writes
overrides; ``SPACES`` maps a name to that function, and the function's ``params`` attribute holds
its default parameter specs. A study selects spaces and narrows parameters::

    space:
      ant: {count: [2, 8], mtl: [uw, nash]}      # [low, high] for a range, a list for choices
      dtr: {active_ratio: 0.8}                   # one value fixes a parameter
      curriculum: {enabled: [true, false]}        # method spaces can switch the method off

Spaces run in ``SPACES`` order and see the overrides drawn before them (``Draw.get``), so the
conditional structure of the methods is written once: Nash's refresh period is drawn only for
Nash, the curriculum is drawn only next to ANT-UW (``compose`` refuses PCGrad/Nash with it).
Optuna parameter names are ``<space>.<param>``. A method adds one function and one entry in
``SPACES``.

Two spaces label a trial instead of shaping a method: ``arm`` picks one of the study's named
override bundles (``arms:``; a comparison study is a grid over arms x seeds) and ``seed`` draws
``train.seed``. Their values travel with the trial (``arm``/``seed`` next to ``overrides``) and
become the MLflow tags ``search.arm``/``search.seed`` that ``denoiselab review --studies`` groups by.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from search.config import StudyError
from trainers.configlib import apply_overrides

__all__ = ["Choice", "IntRange", "FloatRange", "Draw", "SPACES", "SpaceFunction", "resolve_space",
           "grid_of", "check_run_config", "validate_space"]


# --------------------------------------------------------------------------------------------
# Parameter specs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    values: tuple

    def suggest(self, trial, name: str) -> Any:
        if len(self.values) == 1:
            return self.values[0]                      # fixed: not an Optuna parameter
        return trial.suggest_categorical(name, list(self.values))

    def grid(self, name: str) -> list:
        return list(self.values)


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False
    step: int = 1

    def suggest(self, trial, name: str) -> int:
        if self.low == self.high:
            return self.low
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def grid(self, name: str) -> list:
        values = list(range(self.low, self.high + 1, self.step))
        if len(values) > 64:
            raise StudyError(f"space.{name}: {len(values)} grid points; give a short list with {{choices: [...]}}")
        return values


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name: str) -> float:
        if self.low == self.high:
            return self.low
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def grid(self, name: str) -> list:
        if self.low == self.high:
            return [self.low]
        raise StudyError(f"space.{name}: a continuous range cannot be gridded; give values with {{choices: [...]}}")


Spec = Choice | IntRange | FloatRange


def _number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def _narrow(default: Spec, user: Any, where: str) -> Spec:
    """The user's narrowing of one parameter: [low, high], a list of choices, one value, or a mapping."""
    if isinstance(user, Mapping):
        if set(user) == {"choices"} and isinstance(user["choices"], list) and user["choices"]:
            return Choice(tuple(user["choices"]))
        if isinstance(default, Choice) or not set(user) <= {"low", "high", "log", "step"}:
            raise StudyError(f"{where}: unknown keys {sorted(user)}; use [low, high], a value or {{choices: [...]}}")
        user = {"low": default.low, "high": default.high, **user}
        return _range(default, user["low"], user["high"], user.get("log", default.log), user.get("step"), where)
    if isinstance(default, Choice):
        if isinstance(user, (list, tuple)):
            if not user:
                raise StudyError(f"{where}: empty list; give at least one of {list(default.values)}")
            return Choice(tuple(user))
        return Choice((user,))
    if isinstance(user, (list, tuple)):
        if len(user) != 2:
            raise StudyError(f"{where}: a range is [low, high]; for a set of values write {{choices: {list(user)}}}")
        return _range(default, user[0], user[1], default.log, None, where)
    if _number(user, isinstance(default, IntRange)):
        return Choice((user,))
    raise StudyError(f"{where}: expected [low, high], a single value or {{choices: [...]}}, got {user!r}")


def _range(default: Spec, low: Any, high: Any, log: bool, step: Optional[int], where: str) -> Spec:
    integer = isinstance(default, IntRange)
    if not (_number(low, integer) and _number(high, integer)):
        kind = "integers" if integer else "numbers"
        raise StudyError(f"{where}: low and high must be {kind}, got [{low!r}, {high!r}]")
    if low > high:
        raise StudyError(f"{where}: low {low} > high {high}")
    if log and low <= 0:
        raise StudyError(f"{where}: a log range needs low > 0, got {low}")
    if integer:
        return IntRange(int(low), int(high), bool(log), int(step or default.step))
    return FloatRange(float(low), float(high), bool(log))


# --------------------------------------------------------------------------------------------
# Drawing one trial
# --------------------------------------------------------------------------------------------

class Draw:
    """What a space function sees: its parameters (``d("count")``), the overrides drawn so far
    (``d.set``), the effective run config (``d.get``: overrides over the base), the study's arms
    and the trial's labels (``d.label``)."""

    def __init__(self, trial, space: str, specs: Mapping[str, Spec], overrides: dict, base: dict,
                 arms: Optional[Mapping[str, Mapping[str, Any]]] = None, labels: Optional[dict] = None):
        self.trial, self.space, self.specs, self.overrides, self.base = trial, space, specs, overrides, base
        self.arms = arms or {}
        self.labels = labels if labels is not None else {}

    def label(self, key: str, value: Any) -> None:
        self.labels[key] = value

    def __call__(self, param: str) -> Any:
        return self.specs[param].suggest(self.trial, f"{self.space}.{param}")

    def set(self, path: str, value: Any) -> None:
        self.overrides[path] = value

    def get(self, path: str) -> Any:
        node: Any = apply_overrides(self.base, self.overrides)
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return node

    def enabled(self, method: str) -> bool:
        """The ``enabled`` switch of a method space; off writes ``methods.<method>=null``."""
        on = bool(self("enabled"))
        if not on:
            self.set(f"methods.{method}", None)
        return on


def declare(**params: Spec) -> Callable:
    def wrap(fn: Callable) -> Callable:
        fn.params = params
        return fn
    return wrap


_ON = Choice((True,))


@declare(name=Choice(()))                   # the study's arms (resolve_space fills the choices)
def arm_space(d: Draw) -> None:
    """One named bundle of overrides from the study's ``arms:`` (vanilla, DTR, ANT-UW, ...)."""
    name = d("name")
    for path, value in d.arms[name].items():
        d.set(path, value)
    d.label("arm", name)


@declare(value=IntRange(0, 2))
def seed_space(d: Draw) -> None:
    """The trial's ``train.seed`` (initialisation, data order, noise): repeats of every arm."""
    seed = d("value")
    d.set("train.seed", seed)
    d.label("seed", seed)


@declare(name=Choice(("DiT-N/2", "DiT-T/2")))
def model_space(d: Draw) -> None:
    d.set("model.name", d("name"))


@declare(lr=FloatRange(1e-5, 3e-3, log=True))
def optim_space(d: Draw) -> None:
    d.set("train.lr", d("lr"))


@declare(weighting=Choice(("constant", "min_snr", "p2")), min_snr_gamma=FloatRange(1.0, 10.0),
         p2_gamma=FloatRange(0.5, 2.0), p2_k=Choice((1.0,)))
def loss_space(d: Draw) -> None:
    """Min-SNR-γ (Hang et al. 2023) and P2 (Choi et al. 2022) per-sample loss weighting."""
    weighting = d("weighting")
    d.set("loss.weighting", weighting)
    if weighting == "min_snr":
        d.set("loss.gamma", d("min_snr_gamma"))
    elif weighting == "p2":
        d.set("loss.p2_gamma", d("p2_gamma"))
        d.set("loss.p2_k", d("p2_k"))


@declare(enabled=_ON, active_ratio=FloatRange(0.5, 1.0), alpha=FloatRange(1.0, 8.0))
def dtr_space(d: Draw) -> None:
    """DTR routing (Park et al. 2024): β = active_ratio, α = alpha."""
    if d.enabled("dtr"):
        d.set("methods.dtr.active_ratio", d("active_ratio"))
        d.set("methods.dtr.alpha", d("alpha"))


@declare(enabled=_ON, count=IntRange(2, 8), rule=Choice(("uniform", "snr", "log-snr", "timestep")),
         mtl=Choice(("uw", "pcgrad", "nash")), uw_lr=FloatRange(0.005, 0.1, log=True),
         nash_every=IntRange(5, 50, log=True), sampling=Choice(("stratified",)))
def ant_space(d: Draw) -> None:
    """ANT (Go et al. 2023): interval count and rule, the MTL method and its knob. Stratified
    sampling needs the per-worker batch divisible by the count; otherwise the trial samples iid."""
    if not d.enabled("ant"):
        return
    count = d("count")
    d.set("intervals.count", count)
    d.set("intervals.rule", d("rule"))
    mtl = d("mtl")
    d.set("methods.ant.mtl", mtl)
    if mtl == "uw":
        d.set("methods.ant.uw_lr", d("uw_lr"))
    elif mtl == "nash":
        d.set("methods.ant.nash_every", d("nash_every"))
    local_batch = d.get("train.batch_size") // d.get("scaling.num_workers")
    d.set("methods.ant.sampling", d("sampling") if local_batch % count == 0 else "iid")


@declare(enabled=_ON, clusters=IntRange(4, 30), pacing=Choice(("adaptive", "fixed")),
         patience=IntRange(20, 500, log=True), stage_steps=IntRange(20, 500, log=True),
         schedule=Choice(("constant", "linear")), ordering=Choice(("easy_to_hard", "hard_to_easy", "random")))
def curriculum_space(d: Draw) -> None:
    """Task-difficulty curriculum (Kim et al. 2025): clusters, pacing, patience, ordering. It
    composes only with ANT-UW, so next to PCGrad/Nash the trial runs without it."""
    if d.get("methods.ant") and d.get("methods.ant.mtl") in ("pcgrad", "nash"):
        d.set("methods.curriculum", None)
        return
    if not d.enabled("curriculum"):
        return
    d.set("methods.curriculum.clusters", d("clusters"))
    pacing = d("pacing")
    d.set("methods.curriculum.pacing", pacing)
    if pacing == "adaptive":
        d.set("methods.curriculum.patience", d("patience"))
    else:
        d.set("methods.curriculum.stage_steps", d("stage_steps"))
        d.set("methods.curriculum.schedule", d("schedule"))
    d.set("methods.curriculum.ordering", d("ordering"))


@declare(enabled=_ON, mode=Choice(("add", "prompt_tuning", "fine_tuning")), depth=Choice((1.0,)),
         topk=Choice((1.0, 0.5, 0.25)), lr=FloatRange(3e-5, 3e-3, log=True), gate_lr_scale=Choice((1.0, 10.0)),
         importance_weight=Choice((0.0, 0.1, 1.0)), init=Choice(("zero",)))
def dmp_space(d: Draw) -> None:
    """DMP (Ham et al. 2025): patched depth (a fraction of the blocks), top-k ρ, prompt lr, gate lr
    scale, λ_imp and init; ``mode`` puts the fine-tuning and prompt-tuning controls in the study.
    Gate options are drawn only where a gate exists."""
    if not d.enabled("dmp"):
        return
    mode = d("mode")
    d.set("methods.dmp.mode", mode)
    if mode == "fine_tuning":
        return
    from trainers.config import ModelConfig
    from trainers.models.registry import block_count
    model = d.get("model") or {}
    blocks = block_count(ModelConfig(name=model.get("name", "DiT-T/2"), arch=model.get("arch") or {})) or 1
    d.set("methods.dmp.depth", max(1, round(d("depth") * blocks)))
    d.set("methods.dmp.lr", d("lr"))
    d.set("methods.dmp.init", d("init"))
    if mode == "add":
        d.set("methods.dmp.topk", d("topk"))
        d.set("methods.dmp.gate_lr_scale", d("gate_lr_scale"))
        d.set("methods.dmp.importance_weight", d("importance_weight"))


@declare(enabled=_ON, count=IntRange(2, 6), rule=Choice(("uniform", "log-snr")),
         soft=Choice(("hard", "constant", "decreasing")), p=FloatRange(0.5, 1.0), decay=FloatRange(0.3, 0.9),
         r0=FloatRange(0.25, 2.0, log=True), gamma_t=FloatRange(0.4, 1.0), gamma_d=FloatRange(0.4, 1.0),
         width_mult=Choice((1.0,)), depth_mult=Choice((1.0,)), identical=Choice((False, True)))
def meme_space(d: Draw) -> None:
    """MEME (Lee et al. 2024): for a whole set the expert count, interval rule and soft schedule;
    the experts' mixer ratios through the ramp (r0, γ_t, γ_d) or the identical-architecture
    control; width/depth multipliers. With ``methods.meme.expert`` fixed (one interval's expert at
    a time) only its architecture is drawn: the ramp's ratios for that expert, as its ``high``."""
    if not d.enabled("meme"):
        return
    from trainers.methods.meme import RampConfig, ramp_high
    from trainers.models.registry import stage_count
    expert = d.get("methods.meme.expert")
    if expert is None:
        d.set("intervals.count", d("count"))
        d.set("intervals.rule", d("rule"))
        soft = d("soft")
        d.set("methods.meme.soft", soft)
        if soft in ("constant", "decreasing"):
            d.set("methods.meme.p", d("p"))
        if soft == "decreasing":
            d.set("methods.meme.decay", d("decay"))
    model = d.get("model") or {}
    stages = stage_count(model.get("name", ""), model.get("arch") or {}) if model.get("name") else None
    identical = d("identical") if expert is None else False
    d.set("methods.meme.identical", identical)
    if stages is None:
        return                                            # not a U-Net: no mixers to shape
    if not identical:
        ramp = RampConfig(d("r0"), d("gamma_t"), d("gamma_d"))
        if expert is None:
            d.set("methods.meme.ramp", {"r0": ramp.r0, "gamma_t": ramp.gamma_t, "gamma_d": ramp.gamma_d})
        else:
            d.set("model.arch.high", list(ramp_high(ramp, expert, stages)))
    d.set("model.arch.width_mult", d("width_mult"))
    d.set("model.arch.depth_mult", d("depth_mult"))


# name -> space function (drawn in this order); a method adds one function and one entry.
SPACES: dict[str, Callable[[Draw], None]] = {
    "arm": arm_space, "seed": seed_space, "model": model_space, "optim": optim_space, "loss": loss_space,
    "dtr": dtr_space, "ant": ant_space, "curriculum": curriculum_space, "dmp": dmp_space, "meme": meme_space,
}


# --------------------------------------------------------------------------------------------
# A study's space
# --------------------------------------------------------------------------------------------

def resolve_space(space: Mapping[str, Any], arms: Optional[Mapping[str, Any]] = None) -> dict[str, dict[str, Spec]]:
    """The study's ``space:`` (and ``arms:``) -> {space: {param: spec}}; unknown spaces and
    parameters are errors, and so are arms without the ``arm`` space or the other way round."""
    if not space:
        raise StudyError(f"space: empty; select at least one of {', '.join(SPACES)}")
    if ("arm" in space) != bool(arms):
        raise StudyError("space.arm: the study has no arms; define them as arms: {vanilla: {}, dtr: {methods.dtr: "
                         "{...}}}" if "arm" in space else
                         "arms: defined but not searched; add `arm: {}` to space (every arm) or arm: {name: [...]}")
    out: dict[str, dict[str, Spec]] = {}
    for name, narrowing in space.items():
        if name not in SPACES:
            close = difflib.get_close_matches(str(name), list(SPACES), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known spaces: {', '.join(SPACES)}"
            raise StudyError(f"space.{name}: unknown space; {hint}")
        narrowing = narrowing or {}
        if not isinstance(narrowing, Mapping):
            raise StudyError(f"space.{name}: expected a mapping of parameters (or {{}} for the defaults)")
        params = dict(SPACES[name].params)
        if name == "arm":
            params["name"] = Choice(tuple(arms))
        for param, user in narrowing.items():
            if param not in params:
                raise StudyError(f"space.{name}.{param}: unknown parameter; {name} has {', '.join(params)}")
            params[param] = _narrow(params[param], user, f"space.{name}.{param}")
        if name == "arm":
            unknown = [a for a in params["name"].grid("arm.name") if a not in arms]
            if unknown:
                raise StudyError(f"space.arm.name: {unknown} are not arms; the study's arms are {', '.join(arms)}")
        out[name] = params
    return {name: out[name] for name in SPACES if name in out}


class SpaceFunction:
    """The define-by-run function handed to OptunaSearch (plain-picklable: Tune checkpoints it).
    It returns the trial's run-config overrides and its labels (``arm``, ``seed``)."""

    def __init__(self, specs: dict[str, dict[str, Spec]], base: dict,
                 arms: Optional[Mapping[str, Mapping[str, Any]]] = None):
        self.specs, self.base = specs, base
        self.arms = {name: dict(bundle or {}) for name, bundle in (arms or {}).items()}

    def __call__(self, trial) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        labels: dict[str, Any] = {}
        for name, params in self.specs.items():
            SPACES[name](Draw(trial, name, params, overrides, self.base, self.arms, labels))
        return {"overrides": overrides, **labels}


def grid_of(specs: dict[str, dict[str, Spec]], drawn: Optional[set[str]] = None) -> dict[str, list]:
    """Optuna GridSampler search space: every parameter that is drawn (all of them, or those in
    ``drawn``, e.g. from :func:`validate_space`) with its values. Conditional parameters multiply
    the grid even where they do not apply: fix them for a grid study."""
    grid = {f"{space}.{param}": spec.grid(f"{space}.{param}")
            for space, params in specs.items() for param, spec in params.items()
            if drawn is None or f"{space}.{param}" in drawn}
    return {name: values for name, values in grid.items() if len(values) > 1}


def check_run_config(base: dict, overrides: Mapping[str, Any]):
    """The checks the driver makes before a worker starts: strict load, intervals, method plan
    (for a MEME expert set: of every expert)."""
    from trainers.config import load_config
    cfg = load_config(base, dict(overrides))
    if cfg.methods.meme is not None and cfg.methods.meme.expert is None:
        from trainers.methods.meme import expert_configs
        for expert in expert_configs(cfg.replace(name=cfg.name or "trial")):
            _check_plan(expert)
    else:
        _check_plan(cfg)
    return cfg


def _check_plan(cfg) -> None:
    from trainers.build import build_context, resolve_run_intervals
    from trainers.methods import compose, resolve_intervals
    icfg = cfg.intervals
    key = (icfg.rule, icfg.count, icfg.min_width, icfg.pairs, cfg.diffusion.schedule, cfg.diffusion.steps)
    if key not in _INTERVALS:                 # the DP takes ~50 ms at T=1000: once per partition
        if icfg.rule == "affinity":           # the artifact may live in object storage: check the plan only
            _INTERVALS[key] = resolve_intervals("uniform", cfg.diffusion.steps, icfg.count)[0]
        else:
            _INTERVALS[key] = resolve_run_intervals(cfg)[0]
    compose(cfg.methods, build_context(cfg, _INTERVALS[key], cfg.scaling.num_workers))


_INTERVALS: dict = {}


def validate_space(fn: SpaceFunction, samples: int = 48, seed: int = 0,
                   grid: Optional[dict[str, list]] = None, checked: Optional[set[str]] = None) -> set[str]:
    """Draw ``samples`` trials at random (in memory), or every point of ``grid`` (a grid study),
    and check every distinct one as the driver would; returns the Optuna parameters that were
    drawn. Fails before any trial starts, naming the arm where the draw came from one. ``checked``
    (updated in place) holds the draws already checked by an earlier pass, which are skipped."""
    import itertools
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if grid is not None:
        names = list(grid)
        trials = [optuna.trial.FixedTrial(dict(zip(names, point)))
                  for point in itertools.product(*(grid[n] for n in names))]
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        trials = [study.ask() for _ in range(samples)]
    seen: set[str] = set() if checked is None else checked
    drawn_params: set[str] = set()
    for trial in trials:
        try:
            drawn = fn(trial)
        except ValueError as err:            # a FixedTrial lacks a parameter drawn only in some trials
            raise StudyError(f"space: {err}; a grid study needs every drawn parameter in the grid: fix it to one "
                             f"value") from None
        drawn_params.update(trial.params)
        key = repr(sorted(drawn["overrides"].items(), key=lambda kv: kv[0]))
        if key not in seen:
            seen.add(key)
            _check_draw(fn.base, drawn)
    return drawn_params


def _check_draw(base: dict, drawn: dict) -> None:
    from trainers.errors import ConfigError
    overrides = drawn["overrides"]
    try:
        check_run_config(base, overrides)
    except ConfigError as err:
        if "arm" in drawn:
            raise StudyError(f"arms.{drawn['arm']}: not a valid run: {err}") from None
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
        raise StudyError(f"space: the draw {{{shown}}} is not a valid run: {err}") from None
