"""The run-config and study loaders under random documents (hypothesis): each either returns a
valid config or raises the project's own error (a ``UserError``: one line, exit code 2) - never a
``TypeError``, ``KeyError`` or anything else that would reach the user as a traceback.

Documents are mutations of real ones (keys from the real schema, values of every YAML type), so
the fuzzing reaches the validation inside each section, not only the unknown-key check."""
from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.infra.config_io import read_yaml
from search.config import study_from_dict
from tests.helpers import tiny_dict
from trainers.config import RunConfig, load_config
from trainers.errors import UserError

BASE_RUN = {**tiny_dict(), "data": {"name": "digits"}, "methods": {"ant": {"mtl": "uw"}, "dtr": {}},
            "storage": {"path": "./runs"}, "tracking": {"experiment": "x"}, "scaling": {"num_workers": 1}}
BASE_STUDY = {"name": "fuzz", "base": BASE_RUN, "metric": "loss", "mode": "min", "trials": 4,
              "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "methods": ["ant", "dtr"]},
              "scheduler": "asha", "sampler": "tpe"}

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["DiT-N/2", "uw", "linear", "digits", "1e-3", "-1", "",
                                                           "asha", "tpe", "min", "s3://", "../x"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _paths(doc, prefix=()):
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


@st.composite
def mutated(draw, base: dict):
    doc = copy.deepcopy(base)
    paths = list(_paths(doc))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            if not isinstance(parent, dict) or key not in parent:
                break
            parent = parent[key]
        else:
            if not isinstance(parent, dict):
                continue
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace" and path[-1] in parent:
                parent[path[-1]] = draw(VALUES)
            elif action == "delete":
                parent.pop(path[-1], None)
            else:
                parent[draw(st.sampled_from([path[-1] + "s", "x", path[-1][:-1] or "y"]))] = draw(VALUES)
    return doc


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)


@FUZZ
@given(mutated(BASE_RUN))
def test_run_config_loader_returns_a_config_or_a_user_error(doc):
    try:
        assert isinstance(load_config(doc), RunConfig)
    except UserError as err:
        assert str(err) and "\n" not in str(err).strip()


@FUZZ
@given(mutated(BASE_STUDY))
def test_study_loader_returns_a_study_or_a_user_error(doc):
    try:
        study_from_dict(doc)
    except UserError as err:
        assert str(err) and "\n" not in str(err).strip()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=80), VALUES.map(lambda v: yaml.safe_dump(v)),
                 st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_yaml_files_of_any_content_load_or_fail_in_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        data = read_yaml(str(path))
        load_config(data)
    except UserError as err:
        assert str(err) and "\n" not in str(err).strip()
