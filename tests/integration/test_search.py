"""Studies on a real local Ray instance (dashboard on: Train V2's placement-group cleaner needs the
State API), a real Optuna sqlite study and MLflow on sqlite: ASHA stops weak trials, MLflow holds
one parent with a child per trial, Optuna holds every trial, the metric is checked on the first
result, and a study killed mid-way resumes without repeating finished trials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.command import SearchRequest, run_search
from search.config import study_from_dict
from search.tuner import MetricNotReported
from tests.helpers import ray_run_dict, wait_for
from tests.integration.test_driver_crash import _kill_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def search_ray(local_ray, _ray_session):
    """The shared local Ray instance: its GCS address and the State API its workers use."""
    return dict(_ray_session)


def _study(tmp_path: Path, name: str, **fields) -> dict:
    base = ray_run_dict(train={"steps": 40, "checkpoint_every": 10, "log_every": 10, "keep_checkpoints": 1},
                       sample={"n": 0}, storage={"path": str(tmp_path / "runs")},
                       tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "search-it"})
    return {"name": name, "base": base, "output": str(tmp_path / "out" / name), "concurrency": 2,
            "budget": {"trials": 4}, "seed": 0, **fields}


def _optuna(tmp_path: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/out/{name}/optuna.db")


def test_smoke_study_asha_stops_weak_trials(search_ray, tmp_path):
    import ray
    # a 4-point lr grid; with seed 0 the hopeless lr (1e-5) is drawn last, so it meets recorded
    # rungs and ASHA stops it at its first report
    study = study_from_dict(_study(tmp_path, "it-smoke", scheduler={"grace_period": 1, "reduction_factor": 2},
                                   sampler={"kind": "grid"},
                                   space={"optim": {"lr": {"choices": [1e-5, 1e-3, 2e-3, 3e-3]}}}))
    started = time.monotonic()
    out = run_search(SearchRequest(study, register="it-smoke-best", quiet=True))
    print(f"smoke study: {time.monotonic() - started:.0f}s; {out.leaderboard}")
    statuses = sorted(r.status for r in out.records)
    assert len(out.records) == 4 and "stopped" in statuses and "error" not in statuses, out.leaderboard
    slow = next(r for r in out.records if r.overrides["train.lr"] == 1e-5)
    assert slow.status == "stopped" and slow.step == 10
    assert out.best.status == "finished" and out.best.step == 40 and out.best.overrides["train.lr"] > 1e-5

    client = MlflowClient(out.tracking_uri)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["denoiselab.study"] == "it-smoke"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    by_trial = {c.data.tags["search.trial_id"]: c for c in children}
    for rec in out.records:
        assert by_trial[rec.trial_id].data.tags["search.stopped_early"] == str(rec.stopped_early).lower()
        assert by_trial[rec.trial_id].data.params["train.lr"] == str(rec.overrides["train.lr"])
    artifacts = {a.path for a in client.list_artifacts(out.parent_run_id)}
    assert {"leaderboard.md", "leaderboard.json", "best.yaml", "plots"} <= artifacts
    assert client.get_model_version_by_alias("it-smoke-best", "best").run_id == out.best.run_id

    ot = _optuna(tmp_path, "it-smoke")
    assert [t.state.name for t in ot.trials] == ["COMPLETE"] * 4
    assert {t.user_attrs["tune_trial_id"] for t in ot.trials} == {r.trial_id for r in out.records}
    assert sum(t.user_attrs["stopped_early"] for t in ot.trials) == statuses.count("stopped")
    for t in ot.trials:                       # learning curves keyed by training step, stopped trials too
        steps = sorted(t.intermediate_values)
        assert steps and steps == list(range(10, t.user_attrs["steps"] + 1, 10)), (t.number, steps)

    from orchestrator.infra.config_io import load_run_config
    best = load_run_config(str(out.outputs["best_yaml"]))
    assert best.train.lr == out.best.overrides["train.lr"] and best.name == "it-smoke-best"
    wait_for(lambda: all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()), 60, 0.5,
             "every placement group removed (none leaked by stopped trials)")


def test_metric_not_reported_stops_the_study_at_the_first_result(search_ray, tmp_path):
    fields = _study(tmp_path, "it-metric", metric="heldout/nope", budget={"trials": 1}, scheduler="none",
                    space={"optim": {"lr": 1e-3}})
    fields["base"]["train"].update(steps=10, checkpoint_every=5)
    started = time.monotonic()
    with pytest.raises(MetricNotReported, match=r"^metric: trials do not report 'heldout/nope'; they report .*loss"):
        run_search(SearchRequest(study_from_dict(fields), quiet=True))
    print(f"metric check failed the study after {time.monotonic() - started:.0f}s")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("search-it")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`denoiselab.study` = 'it-metric'")
    assert parent[0].info.status == "FAILED"


def _kill_a_worker_past_its_first_checkpoint(runs: Path, killed: list[str]) -> bool:
    for stored in runs.glob("*/step_*/state.pt.sha256"):
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and \
                        proc.environ().get("DENOISELAB_RUN") == stored.parent.parent.name:
                    os.kill(proc.pid, signal.SIGKILL)                # worker loss mid-study: a real SIGKILL
                    killed.append(stored.parent.parent.name)
                    return True
            except (psutil.Error, ProcessLookupError):
                continue
    return False


def test_a_comparison_study_survives_a_worker_kill_and_reviews_as_mean_and_std_per_arm(search_ray, tmp_path, capsys):
    """Arms x seeds on a grid, scored by FD-digits at the end only (no scheduler), tagged per
    trial; one trial's Train worker is SIGKILLed after its first stored checkpoint and that trial
    alone resumes from it; then `denoiselab review --studies` reduces the trials and judges a claim."""
    from orchestrator.cli import main
    fields = _study(tmp_path, "it-arms", metric="fd_digits", scheduler="none", sampler="grid",
                    arms={"vanilla": {}, "dtr": {"methods.dtr": {"active_ratio": 0.5, "alpha": 2.0}}},
                    space={"arm": {}, "seed": {"value": [0, 1]}})
    fields["base"]["train"].update(steps=60, checkpoint_every=5, log_every=5)
    fields["base"]["eval"] = {"n": 24, "steps": 2}
    fields["base"]["scaling"] = {"max_failures": 1}
    killed: list[str] = []
    killer = threading.Thread(target=lambda: wait_for(
        lambda: _kill_a_worker_past_its_first_checkpoint(tmp_path / "runs", killed), 120, 0.1,
        "a running trial with a stored checkpoint"), daemon=True)
    killer.start()
    out = run_search(SearchRequest(study_from_dict(fields), quiet=True))
    killer.join(5)
    assert sorted((r.params["arm"], r.params["seed"]) for r in out.records) == [
        ("dtr", 0), ("dtr", 1), ("vanilla", 0), ("vanilla", 1)]
    assert all(r.status == "finished" and r.value > 0 for r in out.records), out.leaderboard
    assert "arm=dtr, seed=0" in out.leaderboard
    ot = _optuna(tmp_path, "it-arms")
    assert all(list(t.intermediate_values) == [60] for t in ot.trials)  # one report per trial, at the end
    client = MlflowClient(out.tracking_uri)
    fds, resumed = {}, []
    for rec in out.records:
        run = client.get_run(rec.run_id)
        assert run.data.tags["search.arm"] == rec.params["arm"] and run.data.tags["search.seed"] == str(rec.params["seed"])
        assert run.data.params["train.seed"] == str(rec.params["seed"])
        fds.setdefault(rec.params["arm"], []).append(run.data.metrics["fd_digits"])
        steps = sorted(m.step for m in client.get_metric_history(rec.run_id, "loss"))
        assert steps == list(range(5, 61, 5)), (rec.run_name, steps)     # no gaps, no repeats, killed or not
        if "denoiselab.resumed_from_step" in run.data.tags:
            resumed.append(rec.run_name)
    assert killed and resumed == killed, "only the killed trial resumed"

    claims = tmp_path / "claims.yaml"
    claims.write_text("claims:\n  - {paper: DTR, says: DTR beats vanilla, arm: dtr, than: vanilla}\n"
                      "  - {paper: X, says: Y, arm: nope, than: vanilla}\n")
    report = tmp_path / "report"
    capsys.readouterr()
    assert main(["review", "--studies", "it-arms", "--claims", str(claims), "--out", str(report),
                 "--tracking-uri", out.tracking_uri]) == 0
    text = capsys.readouterr().out
    mean = sum(fds["dtr"]) / 2
    std = abs(fds["dtr"][0] - fds["dtr"][1]) / 2 ** 0.5
    assert f"| it-arms | dtr | 2 | {mean:.2f} ± {std:.2f} |" in text, text
    assert "| DTR | DTR beats vanilla | fd_digits |" in text and "| X | Y | fd_digits | - | not measured |" in text
    body = json.loads((report / "arms.json").read_text())
    assert {a["arm"] for a in body["arms"]} == {"vanilla", "dtr"} and len(body["runs"]) == 4
    assert body["arms"][0]["mean"]["cost_tflop"] > 0 and "interval_loss_0" in body["arms"][0]["mean"]
    logged = {a.path for a in client.list_artifacts(out.parent_run_id, "review")}
    assert {"review/arms.md", "review/arms.json", "review/arms_eval.png"} <= logged
    assert main(["review", "--studies", "it-nope", "--tracking-uri", out.tracking_uri]) == 2
    assert "--studies: no study 'it-nope' in this MLflow store" in capsys.readouterr().err


def _cli(tmp_path: Path, study_file: Path, env: dict, log: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "search", str(study_file), "--address",
                             env["RAY_ADDRESS"]], cwd=tmp_path, env=env, stdout=open(tmp_path / log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _complete(tmp_path: Path, name: str) -> dict[str, float]:
    try:
        trials = _optuna(tmp_path, name).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    except Exception:  # noqa: BLE001 - not created yet, or the database is busy
        return {}
    return {t.user_attrs.get("tune_trial_id"): t.value for t in trials}


def test_killed_study_resumes_without_repeating_finished_trials(search_ray, tmp_path):
    fields = _study(tmp_path, "it-resume", budget={"trials": 3}, scheduler="none", sampler="random",
                    space={"optim": {"lr": [1e-4, 3e-3]}})
    fields["base"]["train"].update(steps=30)
    study_file = tmp_path / "resume.yaml"
    study_file.write_text(yaml.safe_dump(fields))
    env = {**os.environ, "RAY_ADDRESS": search_ray["address"], "RAY_API_SERVER_ADDRESS": search_ray["api"],
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    proc = _cli(tmp_path, study_file, env, "first.log")
    try:
        wait_for(lambda: _complete(tmp_path, "it-resume") or proc.poll() is not None, 240, 1.0, "a finished trial")
        time.sleep(4)                                     # Tune records it (experiment state every 1 s here)
        before = _complete(tmp_path, "it-resume")
        assert proc.poll() is None, "the study ended before it could be killed:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
    finally:
        _kill_session(proc.pid)                           # a hard kill of the study's driver
        proc.wait(30)
    killed_at = time.monotonic() - started
    finished_run = tmp_path / "runs" / f"it-resume-{next(iter(before))}" / "denoiselab" / "config.yaml"
    stamp = finished_run.stat().st_mtime_ns
    assert len(before) < 3
    proc = _cli(tmp_path, study_file, env, "second.log")
    try:
        assert proc.wait(360) == 0, (tmp_path / "second.log").read_text()[-4000:]
    finally:
        _kill_session(proc.pid)
    print(f"killed after {killed_at:.0f}s with {len(before)} trial(s) finished; resumed run took "
          f"{time.monotonic() - started - killed_at:.0f}s")
    second = (tmp_path / "second.log").read_text()
    assert "resuming study it-resume" in second
    assert "Logical resource usage" not in second and "Trial status:" not in second   # no Tune tables
    after = _complete(tmp_path, "it-resume")
    assert len(after) == 3 and all(after[t] == v for t, v in before.items())
    assert finished_run.stat().st_mtime_ns == stamp, "a trial finished before the kill was run again"
    board = json.loads((tmp_path / "out" / "it-resume" / "leaderboard.json").read_text())
    assert sorted(t["trial_id"] for t in board["trials"]) == sorted(after)
    assert all(t["status"] == "finished" and t["step"] == 30 for t in board["trials"])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("search-it")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`search.status` = 'finished'")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
