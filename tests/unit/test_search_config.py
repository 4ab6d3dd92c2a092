"""Study plumbing without Ray running: --set routing, concurrency from cluster resources, the
ASHA budget check, a changed study under an existing name, the one-line missing-metric error,
picking the best among full-budget trials, and the leaderboard."""
from __future__ import annotations

from pathlib import Path

import pytest

from search.config import StudyError, base_run_dict, load_study, study_from_dict
from search.results import TrialRecord, leaderboard_text, pick_best
from search.tuner import _missing_metric, concurrency_for, optuna_storage, prepare_study
from tests.helpers import ray_run_dict

STUDIES = Path(__file__).resolve().parents[2] / "search" / "studies"


def _study(tmp_path, **fields):
    base = ray_run_dict(storage={"path": str(tmp_path / "runs")},
                       tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"})
    return study_from_dict({"name": "unit", "base": base, "space": {"optim": {}}, "output": str(tmp_path / "out"),
                            **fields})


def test_set_routes_study_fields_and_run_overrides(tmp_path):
    study = study_from_dict({"name": "s", "space": {"optim": {}}},
                            sets=["budget.trials=3", "scheduler=none", "train.lr=0.002", "space.ant={}"])
    assert study.budget.trials == 3 and study.scheduler.kind == "none"
    assert study.overrides == {"train.lr": 0.002} and set(study.space) == {"optim", "ant"}
    assert base_run_dict(study)["train"]["lr"] == 0.002
    study = study_from_dict({"name": "s", "space": {"optim": {}}},
                            sets=["storage=sqlite:////tmp/o.db", f"storage.path={tmp_path}/runs"])
    assert study.storage == "sqlite:////tmp/o.db" and study.overrides == {"storage.path": f"{tmp_path}/runs"}


def test_shipped_studies_load_and_validate():
    for name in ("smoke", "intervals", "curriculum", "routing"):
        study = load_study(str(STUDIES / f"{name}.yaml"))
        base = base_run_dict(study)
        assert study.name == name and base["storage"]["path"].startswith("/"), name


def test_relative_experiment_and_missing_file(tmp_path):
    (tmp_path / "exp.yaml").write_text("model: {name: DiT-N/2}\ntrain: {steps: 7}\nname: fixed\n")
    (tmp_path / "study.yaml").write_text("experiment: exp.yaml\nspace: {optim: {}}\n")
    study = load_study(str(tmp_path / "study.yaml"))
    assert study.name == "study" and base_run_dict(study)["train"]["steps"] == 7
    assert base_run_dict(study)["name"] is None              # every trial names its own run
    (tmp_path / "bad.yaml").write_text("experiment: nope.yaml\nspace: {optim: {}}\n")
    with pytest.raises(StudyError, match=r"bad.yaml: experiment: nope.yaml not found"):
        load_study(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("scaling, resources, expected", [
    ({"num_workers": 1, "cpus_per_worker": 1}, {"CPU": 4}, 4),
    ({"num_workers": 2, "cpus_per_worker": 1}, {"CPU": 5}, 2),
    ({"num_workers": 1, "cpus_per_worker": 8}, {"CPU": 4}, 1),
    ({"num_workers": 2, "use_gpu": True}, {"CPU": 64, "GPU": 8}, 4),
    ({"num_workers": 1, "use_gpu": True, "resources_per_worker": {"GPU": 0.5}}, {"CPU": 64, "GPU": 2}, 4),
])
def test_concurrency_follows_cluster_resources(tmp_path, scaling, resources, expected):
    study = _study(tmp_path, budget={"trials": 16})
    base = base_run_dict(study)
    base["scaling"].update(scaling)
    assert concurrency_for(study, base, resources) == expected
    assert concurrency_for(_study(tmp_path, concurrency=3, budget={"trials": 2}), base, resources) == 2


def test_grace_period_must_leave_something_to_stop(tmp_path):
    study = _study(tmp_path, scheduler={"grace_period": 2})    # tiny config: 20 steps, a report every 10
    with pytest.raises(StudyError, match=r"^scheduler.grace_period: 2 reports leaves nothing to stop"):
        prepare_study(study)


def test_changed_study_under_existing_name_is_refused(tmp_path):
    prepare_study(_study(tmp_path))
    (tmp_path / "runs" / "tune" / "unit").mkdir(parents=True)       # as if Tune had started it
    prepare_study(_study(tmp_path))                                # unchanged: resumes
    with pytest.raises(StudyError, match=r"^name: study 'unit' already exists .* with a different config"):
        prepare_study(_study(tmp_path, overrides={"train.lr": 0.01}))


def test_missing_metric_becomes_one_line():
    tune_error = ValueError("Trial returned a result which did not include the specified metric(s) `fd` that "
                            "`OptunaSearch` expects. Make sure ... Result: {'loss': 0.5, 'mse': 0.4, "
                            "'interval/loss_0': 0.3, 'step': 10.0, 'trial_id': 'abc', 'done': False}")
    assert _missing_metric(RuntimeError("unrelated"), "fd") is None
    wrapped = RuntimeError("tune failed")
    wrapped.__cause__ = tune_error
    err = _missing_metric(wrapped, "fd")
    assert str(err) == ("metric: trials do not report 'fd'; they report loss, mse, step; "
                        "set metric to one of those (e.g. loss)")


def test_optuna_storage_urls(tmp_path):
    import optuna
    assert isinstance(optuna_storage(f"sqlite:///{tmp_path}/o.db"), optuna.storages.RDBStorage)
    assert isinstance(optuna_storage(f"journal://{tmp_path}/o.log"), optuna.storages.JournalStorage)
    with pytest.raises(StudyError, match=r"^storage: cannot open the Optuna storage"):
        optuna_storage("nosuchdb://x")


def _rec(tid, status, value, step=40):
    return TrialRecord(tid, f"s-{tid}", status, value, step, {"train.lr": 0.001})


def test_best_is_chosen_among_full_budget_trials():
    records = [_rec("a", "finished", 0.5), _rec("b", "stopped", 0.3, 10), _rec("c", "finished", 0.4),
               _rec("d", "error", None, None)]
    assert pick_best(records, "min", include_stopped=False).trial_id == "c"
    assert pick_best(records, "min", include_stopped=True).trial_id == "b"
    assert pick_best(records, "max", include_stopped=False).trial_id == "a"
    assert pick_best([_rec("b", "stopped", 0.3, 10)], "min", include_stopped=False) is None
    board = leaderboard_text(records, "loss", "min").splitlines()
    assert [line.split()[1] for line in board[1:]] == ["c", "a", "b", "d"]
    assert "stopped" in board[3] and "train.lr=0.001" in board[1]
