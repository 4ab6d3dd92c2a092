"""The run config: strict loading, dotted overrides, round trip, run names, cross-field checks."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from trainers.config import RunConfig, load_config, run_name_for
from trainers.configlib import apply_overrides, flatten, from_dict, parse_value, set_dotted, to_dict
from trainers.errors import ConfigError, UserError
from trainers.methods.ant import AntConfig


def _error(data, overrides=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(data, overrides)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)   # one line for the CLI
    return str(err.value)


def test_defaults_load() -> None:
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.model.name == "DiT-T/2" and cfg.methods.ant is None and cfg.local_batch_size == 64


# ------------------------------------------------------------------------------ strictness
@pytest.mark.parametrize("data, path, suggestion", [
    ({"trian": {}}, "trian", "'train'"),
    ({"train": {"stpes": 5}}, "train.stpes", "'steps'"),
    ({"methods": {"ant": {"mtll": "uw"}}}, "methods.ant.mtll", "'mtl'"),
    ({"methods": {"curriculum": {"patiense": 3}}}, "methods.curriculum.patiense", "'patience'"),
    ({"methods": {"dtrr": {}}}, "methods.dtrr", "'dtr'"),
])
def test_unknown_key_names_dotted_path_and_suggestion(data, path, suggestion) -> None:
    msg = _error(data)
    assert msg.startswith(f"{path}: unknown key") and f"did you mean {suggestion}" in msg


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    msg = _error({"train": {"zzzz": 1}})
    assert msg.startswith("train.zzzz: unknown key") and "valid keys:" in msg and "batch_size" in msg


@pytest.mark.parametrize("data, expected", [
    ({"train": {"steps": "ten"}}, "train.steps: expected an integer, got 'ten'"),
    ({"train": {"steps": 2.5}}, "train.steps: expected an integer"),
    ({"train": {"steps": True}}, "train.steps: expected an integer"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
    ({"train": {"lr": False}}, "train.lr: expected a number"),
    ({"train": {"lr": float("nan")}}, "train.lr: expected a finite number"),
    ({"data": {"flip": "yes"}}, "data.flip: expected true or false"),
    ({"model": {"name": 5}}, "model.name: expected a string"),
    ({"model": {"arch": {"hidden_size": "big"}}}, "model.arch.hidden_size: expected an integer"),
    ({"model": {"hidden_size": 64}}, "model.hidden_size: unknown key"),
    ({"model": "DiT-T/2"}, "model: expected a mapping"),
    ({"methods": {"ant": 3}}, "methods.ant: expected a mapping of AntConfig fields"),
    ({"intervals": {"rule": "explicit", "pairs": [[0, 50, 1]]}}, "intervals.pairs[0]: expected 2 items"),
    ({"intervals": {"rule": "explicit", "pairs": 5}}, "intervals.pairs: expected a list"),
    ({"scaling": {"resources_per_worker": {"GPU": "one"}}}, "scaling.resources_per_worker.GPU: expected a number"),
])
def test_wrong_types(data, expected) -> None:
    assert expected in _error(data)


@pytest.mark.parametrize("data, field", [
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"batch_size": -4}}, "train.batch_size"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"ema_decay": 1.0}}, "train.ema_decay"),
    ({"model": {"class_dropout": 1.0}}, "model.class_dropout"),
    ({"diffusion": {"steps": 1}}, "diffusion.steps"),
    ({"intervals": {"count": 0}}, "intervals.count"),
    ({"intervals": {"rule": "explicit"}}, "intervals.pairs"),
    ({"intervals": {"rule": "affinity"}}, "intervals.artifact"),
    ({"data": {"name": "parquet"}}, "data.path"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
    ({"train": {"grad_clip": -1.0}}, "train.grad_clip"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay"),
    ({"train": {"sample_every": -1}}, "train.sample_every"),
    ({"loss": {"weighting": "min_snr", "gamma": 0.0}}, "loss.gamma"),
    ({"loss": {"weighting": "p2", "p2_k": 0.0}}, "loss.p2_gamma/p2_k"),
    ({"loss": {"weighting": "p2", "p2_gamma": -1.0}}, "loss.p2_gamma/p2_k"),
    ({"sample": {"steps": 0}}, "sample.steps"),
    ({"eval": {"n": -1}}, "eval."),
    ({"methods": {"dtr": {"active_ratio": 0.0}}}, "methods.dtr.active_ratio"),
    ({"methods": {"dtr": {"active_ratio": 1.5}}}, "methods.dtr.active_ratio"),
    ({"methods": {"ant": {"uw_lr": -1}}}, "methods.ant.uw_lr"),
    ({"methods": {"ant": {"nash_every": 0}}}, "methods.ant.nash_every"),
    ({"methods": {"curriculum": {"ema": 1.0}}}, "methods.curriculum.ema"),
])
def test_out_of_range_values_name_the_field(data, field) -> None:
    assert _error(data).startswith(field)


@pytest.mark.parametrize("data, path, choices", [
    ({"diffusion": {"schedule": "quadratic"}}, "diffusion.schedule", "'linear', 'cosine'"),
    ({"methods": {"ant": {"mtl": "gradnorm"}}}, "methods.ant.mtl", "'uw', 'pcgrad', 'nash'"),
    ({"methods": {"ant": {"sampling": "random"}}}, "methods.ant.sampling", "'stratified', 'iid'"),
    ({"loss": {"weighting": "snr"}}, "loss.weighting", "'constant', 'min_snr', 'p2'"),
    ({"train": {"precision": "fp8"}}, "train.precision", "'fp32', 'bf16', 'fp16'"),
])
def test_literal_choices(data, path, choices) -> None:
    msg = _error(data)
    assert msg.startswith(path) and choices in msg


def test_configs_are_frozen() -> None:
    cfg = load_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 5  # type: ignore[misc]


# ------------------------------------------------------------------------------- overrides
def test_dotted_overrides() -> None:
    cfg = load_config({"train": {"steps": 3}}, [
        "train.steps=7", "train.lr=3e-4", "data.flip=true", "model.arch.depth=3",
        "model.name=DiT-N/4", "methods.ant.mtl=nash", "methods.dtr.blocks=[0, 2]",
        "intervals.rule=explicit", "intervals.count=2", "intervals.pairs=[[0, 300], [300, 1000]]",
        "scaling.resources_per_worker={\"GPU\": 1}",
    ])
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4 and cfg.data.flip is True
    assert cfg.model.arch == {"depth": 3} and cfg.model.name == "DiT-N/4"
    assert cfg.methods.ant == AntConfig(mtl="nash")                  # override creates the section
    assert cfg.methods.dtr.blocks == (0, 2)
    assert cfg.intervals.pairs == ((0, 300), (300, 1000))
    assert cfg.scaling.resources_per_worker == {"GPU": 1.0}


def test_dict_overrides_as_from_tune_and_input_untouched() -> None:
    raw = {"train": {"steps": 3}}
    cfg = load_config(raw, {"train.steps": 9, "methods.curriculum.patience": 5})
    assert cfg.train.steps == 9 and cfg.methods.curriculum.patience == 5
    assert raw == {"train": {"steps": 3}}


def test_override_validation_goes_through_the_same_path() -> None:
    assert _error({}, ["methods.ant.mtl=foo"]).startswith("methods.ant.mtl: 'foo' is not one of")
    assert _error({}, ["train.stepz=3"]).startswith("train.stepz: unknown key; did you mean 'steps'")
    assert "train.steps=200" in _error({}, ["train.steps"])          # no '=': shows the form
    assert "empty key segment" in _error({}, ["train..steps=1"])


@pytest.mark.parametrize("text, value", [
    ("true", True), ("False", False), ("on", True), ("no", False), ("null", None), ("~", None),
    ("3", 3), ("2.5", 2.5), ("1e-4", 1e-4), ("[1, 2]", [1, 2]), ('{"a": 1}', {"a": 1}),
    ("DiT-B/2", "DiT-B/2"), ("s3://bucket/x", "s3://bucket/x"), ("", ""),
])
def test_parse_value(text, value) -> None:
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_set_dotted_and_apply_overrides_copy() -> None:
    raw = {"a": {"b": 1, "c": 2}}
    out = set_dotted(raw, "a.b", 5)
    assert out == {"a": {"b": 5, "c": 2}} and raw == {"a": {"b": 1, "c": 2}}
    assert apply_overrides({}, ["x.y.z=1"]) == {"x": {"y": {"z": 1}}}


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": "{}"}


# ------------------------------------------------------------------------------ round trip
def test_round_trip_to_dict_from_dict() -> None:
    cfg = load_config({
        "name": "rt", "model": {"name": "DiT-N/2", "arch": {"depth": 2}}, "diffusion": {"schedule": "cosine", "steps": 50},
        "intervals": {"rule": "explicit", "count": 2, "pairs": [[0, 20], [20, 50]]},
        "methods": {"ant": {"mtl": "uw", "sampling": "iid"}, "dtr": {"active_ratio": 0.7, "blocks": [0, 1]},
                    "curriculum": {"clusters": 5, "pacing": "fixed"}},
        "loss": {"weighting": "min_snr", "gamma": 3.0},
        "train": {"steps": 12, "batch_size": 8, "precision": "bf16"},
        "scaling": {"num_workers": 2, "resources_per_worker": {"GPU": 0.5}},
        "storage": {"path": "s3://b/p", "endpoint": "http://127.0.0.1:9000"},
    })
    data = cfg.to_dict()
    assert data == to_dict(cfg)
    assert from_dict(RunConfig, data) == cfg
    assert load_config(json.loads(json.dumps(data))) == cfg             # survives JSON / YAML plain types
    assert isinstance(data["intervals"]["pairs"], list) and data["methods"]["ant"]["mtl"] == "uw"


# ------------------------------------------------------------------------------- run names
def test_run_name_is_deterministic_and_ignores_where_it_runs() -> None:
    base = {"model": {"name": "DiT-N/2"}, "train": {"steps": 10, "lr": 1e-3}}
    name = run_name_for(load_config(base))
    assert re.fullmatch(r"digits-dit-n2-[0-9a-f]{10}", name)
    reordered = {"train": {"lr": 1e-3, "steps": 10}, "model": {"name": "DiT-N/2"}}
    assert run_name_for(load_config(reordered)) == name
    for overrides in (["tracking.uri=http://mlflow:5000", "tracking.experiment=other"],
                      ["storage.path=s3://bucket/runs", "storage.endpoint=http://127.0.0.1:9000"],
                      ["sample.n=4", "eval.n=100"],
                      ["scaling.cpus_per_worker=4", "scaling.max_failures=3", "scaling.placement_strategy=SPREAD"]):
        assert run_name_for(load_config(base, overrides)) == name, overrides
    for overrides in (["train.lr=2e-3"], ["methods.ant.mtl=uw"], ["scaling.num_workers=2"], ["train.seed=1"]):
        assert run_name_for(load_config(base, overrides)) != name, overrides
    assert run_name_for(load_config(base, ["name=my-run"])) == "my-run"


# ------------------------------------------------------------------------ cross-field checks
def test_batch_not_divisible_by_workers() -> None:
    msg = _error({"train": {"batch_size": 10}, "scaling": {"num_workers": 4}})
    assert msg.startswith("train.batch_size") and "num_workers=4" in msg
    assert load_config({"train": {"batch_size": 12}, "scaling": {"num_workers": 4}}).local_batch_size == 3


def test_more_intervals_than_timesteps() -> None:
    msg = _error({"intervals": {"count": 20}, "diffusion": {"steps": 10}})
    assert msg.startswith("intervals.count") and "diffusion.steps" in msg
    assert load_config({"intervals": {"count": 10}, "diffusion": {"steps": 10}}).intervals.count == 10
