"""Search spaces: every branch of every space draws overrides the driver accepts (fuzzed through
real Optuna studies in memory, each draw checked by the config loader and the method plan; no
training), narrowing works, and bad study configs fail with one clear line."""
from __future__ import annotations

import pickle
import warnings
from collections import defaultdict

import optuna
import pytest

from search.config import StudyError, base_run_dict, study_from_dict
from search.spaces import (SPACES, Choice, FloatRange, IntRange, SpaceFunction, check_run_config, grid_of,
                           resolve_space, validate_space)
from tests.helpers import ray_run_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)

EVERYTHING = {"model": {}, "optim": {}, "loss": {}, "dtr": {"enabled": [True, False]},
              "ant": {"enabled": [True, False], "sampling": ["stratified", "iid"]},
              "curriculum": {"enabled": [True, False], "clusters": [2, 20], "patience": [2, 50],
                             "stage_steps": [2, 50]}}


def _study(space=None, **fields) -> dict:
    base = ray_run_dict()
    base.pop("name", None)
    return {"name": "unit", "base": base, "space": EVERYTHING if space is None else space, **fields}


def _fuzz(sampler, n: int = 200) -> list[dict]:
    study = study_from_dict(_study())
    fn = SpaceFunction(resolve_space(study.space), base_run_dict(study))
    ot = optuna.create_study(sampler=sampler)
    draws = []
    for i in range(n):
        trial = ot.ask()
        overrides = fn(trial)["overrides"]
        check_run_config(fn.base, overrides)                 # raises on any invalid draw
        draws.append(overrides)
        ot.tell(trial, float((i * 7919) % 101) / 101.0)      # arbitrary values so TPE models something
    return draws


@pytest.mark.parametrize("make_sampler", [
    lambda: optuna.samplers.RandomSampler(seed=1),
    lambda: optuna.samplers.TPESampler(seed=2, multivariate=True, group=True, n_startup_trials=20),
], ids=["random", "tpe-multivariate"])
def test_fuzzed_draws_are_valid_runs_and_cover_every_branch(make_sampler):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # TPE group=True is experimental
        draws = _fuzz(make_sampler())
    seen = defaultdict(set)
    for d in draws:
        for key, value in d.items():
            seen[key].add(value if not isinstance(value, float) else "float")
    assert seen["methods.ant.mtl"] == {"uw", "pcgrad", "nash"}
    assert seen["loss.weighting"] == {"constant", "min_snr", "p2"}
    assert seen["methods.curriculum.pacing"] == {"adaptive", "fixed"}
    assert seen["methods.curriculum.ordering"] == {"easy_to_hard", "hard_to_easy", "random"}
    assert seen["model.name"] == {"DiT-N/2", "DiT-T/2"}
    for method in ("ant", "dtr", "curriculum"):
        assert None in seen[f"methods.{method}"], f"{method} never switched off"
    assert "iid" in seen["methods.ant.sampling"] and "stratified" in seen["methods.ant.sampling"]
    assert "methods.ant.nash_every" in seen and "methods.ant.uw_lr" in seen
    for d in draws:                                          # conditional structure
        if d.get("methods.ant.mtl") in ("pcgrad", "nash"):
            assert d.get("methods.curriculum", "absent") is None, d
        if d.get("methods.ant.mtl") != "nash":
            assert "methods.ant.nash_every" not in d
        if d.get("loss.weighting") == "constant":
            assert "loss.gamma" not in d


def test_every_space_alone_draws_valid_runs():
    for name in SPACES:
        arms = {"a": {"train.lr": 1e-3}, "b": {}} if name == "arm" else {}
        study = study_from_dict(_study({name: {}}, base={**ray_run_dict(), "diffusion": {"steps": 100}}, arms=arms))
        fn = SpaceFunction(resolve_space(study.space, study.arms), base_run_dict(study), study.arms)
        drawn = validate_space(fn, samples=24, seed=3)
        assert drawn and all(p.startswith(f"{name}.") for p in drawn), name


def test_narrowing_ranges_choices_and_fixed_values():
    specs = resolve_space({"ant": {"count": [2, 8], "mtl": ["uw"], "uw_lr": 0.01, "nash_every": {"low": 10}},
                           "optim": {"lr": {"choices": [1e-4, 1e-3]}}, "dtr": {}})
    assert list(specs) == ["optim", "dtr", "ant"]            # drawn in registry order, not YAML order
    assert specs["ant"]["count"] == IntRange(2, 8)
    assert specs["ant"]["mtl"] == Choice(("uw",))
    assert specs["ant"]["uw_lr"] == Choice((0.01,))
    assert specs["ant"]["nash_every"] == IntRange(10, 50, log=True)
    assert specs["optim"]["lr"] == Choice((1e-4, 1e-3))
    assert specs["dtr"]["alpha"] == FloatRange(1.0, 8.0)
    trial = optuna.create_study().ask()
    out = SpaceFunction(specs, base_run_dict(study_from_dict(_study())))(trial)
    assert out["overrides"]["methods.ant.mtl"] == "uw" and out["overrides"]["methods.ant.uw_lr"] == 0.01
    assert "ant.mtl" not in trial.params                     # fixed values are not Optuna parameters
    assert set(trial.params) >= {"ant.count", "optim.lr", "dtr.alpha"}


def test_grid_of_enumerates_drawn_parameters_and_refuses_continuous_ranges():
    specs = resolve_space({"ant": {"count": [2, 4], "mtl": ["uw", "nash"], "uw_lr": 0.02,
                                   "nash_every": 25, "rule": "uniform"}})
    assert grid_of(specs) == {"ant.count": [2, 3, 4], "ant.mtl": ["uw", "nash"]}
    specs = resolve_space({"ant": {"count": [2, 4], "mtl": ["uw", "pcgrad"], "uw_lr": 0.02, "rule": "uniform"}})
    fn = SpaceFunction(specs, base_run_dict(study_from_dict(_study())))
    drawn = validate_space(fn, samples=16)                   # nash_every is never drawn without nash
    assert drawn == {"ant.count", "ant.mtl"}
    assert grid_of(specs, drawn) == {"ant.count": [2, 3, 4], "ant.mtl": ["uw", "pcgrad"]}
    with pytest.raises(StudyError, match=r"space.optim.lr: a continuous range cannot be gridded"):
        grid_of(resolve_space({"optim": {}}))


def test_space_function_pickles():
    study = study_from_dict(_study())
    fn = SpaceFunction(resolve_space(study.space), base_run_dict(study))
    clone = pickle.loads(pickle.dumps(fn))                   # Tune checkpoints the searcher with plain pickle
    a, b = optuna.create_study(sampler=optuna.samplers.RandomSampler(0)), \
        optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    assert fn(a.ask()) == clone(b.ask())


@pytest.mark.parametrize("space, message", [
    ({}, r"^space: empty; select at least one"),
    ({"antt": {}}, r"^space.antt: unknown space; did you mean 'ant'\?"),
    ({"ant": {"counts": [2, 4]}}, r"^space.ant.counts: unknown parameter; ant has enabled, count"),
    ({"ant": {"count": [8, 2]}}, r"^space.ant.count: low 8 > high 2"),
    ({"ant": {"count": [2, 4, 8]}}, r"^space.ant.count: a range is \[low, high\]; for a set of values"),
    ({"ant": {"count": [2.5, 4]}}, r"^space.ant.count: low and high must be integers"),
    ({"optim": {"lr": [0, 1]}}, r"^space.optim.lr: a log range needs low > 0"),
    ({"ant": {"mtl": []}}, r"^space.ant.mtl: empty list"),
    ({"dtr": "all"}, r"^space.dtr: expected a mapping of parameters"),
])
def test_bad_spaces_fail_with_one_line(space, message):
    with pytest.raises(StudyError, match=message) as info:
        resolve_space(space) if space else study_from_dict(_study(space))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fields, message", [
    ({"scheduler": "hyperband"}, r"^scheduler.kind: 'hyperband' is not one of 'asha', 'none'"),
    ({"sampler": {"kind": "cmaes"}}, r"^sampler.kind: 'cmaes' is not one of 'tpe', 'random', 'grid'"),
    ({"budjet": {"trials": 2}}, r"^budjet: unknown key; did you mean 'budget'\?"),
    ({"budget": {"trials": 0}}, r"^budget.trials: must be >= 1"),
    ({"mode": "minimize"}, r"^mode: 'minimize' is not one of 'min', 'max'"),
    ({"name": "has space"}, r"^name: 'has space' must be 1-64 letters"),
    ({"scheduler": {"reduction_factor": 1}}, r"^scheduler.reduction_factor: must be >= 2"),
])
def test_bad_study_fields_fail_with_one_line(fields, message):
    with pytest.raises(StudyError, match=message) as info:
        study_from_dict(_study(**fields))
    assert "\n" not in str(info.value)


def test_unknown_parameter_paths_fail_before_any_trial():
    study = study_from_dict(_study(overrides={"train.stepz": 5}))
    with pytest.raises(StudyError, match=r"^base config: train.stepz: unknown key; did you mean 'steps'\?"):
        base_run_dict(study)
    with pytest.raises(StudyError, match=r"is neither a study field .* nor a run-config section"):
        study_from_dict(_study(), sets=["trian.lr=0.1"])
    # a space whose draws the driver would refuse: more curriculum clusters than timesteps
    study = study_from_dict(_study({"curriculum": {"clusters": [200, 300]}}))
    fn = SpaceFunction(resolve_space(study.space), base_run_dict(study))
    with pytest.raises(StudyError, match=r"^space: the draw \{.*\} is not a valid run: .*clusters") as info:
        validate_space(fn, samples=4)
    assert "\n" not in str(info.value)


def test_dmp_space_draws_the_controls_and_gate_options_only_with_a_gate():
    study = study_from_dict(_study({"dmp": {"depth": {"choices": [0.25, 1.0]}}}, base={**ray_run_dict()}))
    fn = SpaceFunction(resolve_space(study.space), base_run_dict(study))
    ot = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    modes, depths = set(), set()
    for _ in range(60):
        overrides = fn(ot.ask())["overrides"]
        check_run_config(fn.base, overrides)
        mode = overrides["methods.dmp.mode"]
        modes.add(mode)
        if mode == "fine_tuning":
            assert set(overrides) == {"methods.dmp.mode"}
            continue
        depths.add(overrides["methods.dmp.depth"])                      # fractions of DiT-N's 4 blocks
        assert ("methods.dmp.topk" in overrides) == (mode == "add")
    assert modes == {"add", "prompt_tuning", "fine_tuning"} and depths == {1, 4}


def test_meme_space_draws_whole_sets_or_one_experts_architecture():
    meme = {"meme": {"soft": "decreasing", "ramp": {"r0": 1.0}}}
    sets = study_from_dict(_study({"meme": {}}, base={**ray_run_dict(), "model": {"name": "UNet-N"},
                                                      "methods": meme}))
    fn = SpaceFunction(resolve_space(sets.space), base_run_dict(sets))
    ot = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = defaultdict(set)
    for _ in range(40):
        overrides = fn(ot.ask())["overrides"]
        check_run_config(fn.base, overrides)                        # every expert of the set is valid
        seen["identical"].add(overrides["methods.meme.identical"])
        seen["count"].add(overrides["intervals.count"])
        assert ("methods.meme.ramp" in overrides) != overrides["methods.meme.identical"]
    assert seen["identical"] == {True, False} and seen["count"] == {2, 3, 4, 5, 6}
    one = study_from_dict(_study({"meme": {}}, base={**ray_run_dict(), "model": {"name": "UNet-N"}, "methods": meme},
                                 overrides={"methods.meme.expert": 2}))
    fn = SpaceFunction(resolve_space(one.space), base_run_dict(one))
    drawn = validate_space(fn, samples=16)
    assert drawn == {"meme.r0", "meme.gamma_t", "meme.gamma_d"}       # only the expert's architecture
    overrides = fn(optuna.create_study().ask())["overrides"]
    assert len(overrides["model.arch.high"]) == 2 and "intervals.count" not in overrides


# --------------------------------------------------------------------------------------------
# Comparison studies: named arms x seeds
# --------------------------------------------------------------------------------------------

ARMS = {"vanilla": {}, "dtr": {"methods.dtr": {"active_ratio": 0.8, "alpha": 4.0}},
        "ant-uw": {"methods.ant": {"mtl": "uw"}}, "plain": None}


def _arms_study(**fields):
    return study_from_dict(_study({"arm": {}, "seed": {"value": [0, 2]}}, arms=ARMS, sampler="grid", **fields))


def test_a_grid_over_arms_and_seeds_draws_every_pair_once_with_its_labels():
    study = _arms_study()
    fn = SpaceFunction(resolve_space(study.space, study.arms), base_run_dict(study), study.arms)
    grid = grid_of(fn.specs)
    assert grid == {"arm.name": ["vanilla", "dtr", "ant-uw", "plain"], "seed.value": [0, 1, 2]}
    assert validate_space(fn, grid=grid) == {"arm.name", "seed.value"}        # every point checked
    ot = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    drawn = []
    for i in range(12):
        trial = ot.ask()
        out = fn(trial)
        drawn.append((out["arm"], out["seed"]))
        assert out["overrides"]["train.seed"] == out["seed"]
        for path, value in (ARMS[out["arm"]] or {}).items():
            assert out["overrides"][path] == value
        assert set(out["overrides"]) == {"train.seed", *(ARMS[out["arm"]] or {})}
        if i < 11:                                     # the last tell stops a grid study (outside optimize)
            ot.tell(trial, 0.0)
    assert sorted(drawn) == sorted((a, s) for a in ARMS for s in range(3))
    assert pickle.loads(pickle.dumps(fn)).arms == fn.arms                     # Tune checkpoints the function


def test_arms_narrow_and_fail_with_one_line():
    study = study_from_dict(_study({"arm": {"name": ["dtr"]}}, arms=ARMS))
    fn = SpaceFunction(resolve_space(study.space, study.arms), base_run_dict(study), study.arms)
    assert fn(optuna.trial.FixedTrial({}))["arm"] == "dtr"                   # one arm: not an Optuna parameter
    with pytest.raises(StudyError, match=r"^space.arm.name: \['dtr2'\] are not arms; the study's arms are vanilla"):
        resolve_space({"arm": {"name": ["dtr2"]}}, ARMS)
    with pytest.raises(StudyError, match=r"^space.arm: the study has no arms; define them"):
        resolve_space({"arm": {}}, {})
    with pytest.raises(StudyError, match=r"^arms: defined but not searched; add `arm: \{\}`"):
        resolve_space({"optim": {}}, ARMS)
    with pytest.raises(StudyError, match=r"^arms.a/b: an arm name is 1-64 letters"):
        study_from_dict(_study({"arm": {}}, arms={"a/b": {}}))
    with pytest.raises(StudyError, match=r"^arms.x: expected a mapping of run-config overrides"):
        study_from_dict(_study({"arm": {}}, arms={"x": [1, 2]}))
    bad = study_from_dict(_study({"arm": {}}, arms={**ARMS, "broken": {"methods.ant": {"mtl": "pcgrad"},
                                                                       "methods.curriculum": {}}}, sampler="grid"))
    fn = SpaceFunction(resolve_space(bad.space, bad.arms), base_run_dict(bad), bad.arms)
    with pytest.raises(StudyError, match=r"^arms.broken: not a valid run: "):
        validate_space(fn, grid=grid_of(fn.specs))
