"""MEME on real parts: ``denoiselab experts`` trains a set of 2 tiny experts concurrently on a
local Ray instance, writes a manifest that round-trips, resumes only unfinished experts, and the set
samples, evaluates and costs through the router; a tiny expert-set study runs 2 trials."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli import main
from orchestrator.infra.storage import open_storage
from orchestrator.jobs.experts import ExpertsRequest, read_manifest, run_experts
from tests.helpers import ray_run_dict
from trainers.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SET = {"meme": {"soft": "decreasing", "ramp": {"r0": 1.0, "gamma_t": 0.5, "gamma_d": 0.7}, "baseline": "UNet-T"}}


@pytest.fixture(scope="module", autouse=True)
def eval_cache(tmp_path_factory):
    previous = os.environ.get("DENOISELAB_CACHE")
    os.environ["DENOISELAB_CACHE"] = previous or str(tmp_path_factory.mktemp("denoiselab-cache"))
    yield
    if previous is None:
        os.environ.pop("DENOISELAB_CACHE", None)


def _set_config(root, **extra) -> dict:
    return ray_run_dict(name="tiny-set", model={"name": "UNet-N"}, intervals={"count": 2}, methods=SET,
                        train={"steps": 10, "checkpoint_every": 10, "log_every": 5}, sample={"n": 0, "steps": 3},
                        storage={"path": str(root / "runs")},
                        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "meme"}, **extra)


@pytest.fixture(scope="module")
def expert_set(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("meme")
    out = run_experts(ExpertsRequest(load_config(_set_config(root)), quiet=True))
    return {"root": root, "out": out, "runs": str(root / "runs")}


def test_experts_train_concurrently_and_the_manifest_round_trips(expert_set):
    out, runs = expert_set["out"], expert_set["runs"]
    assert out.trained == [0, 1] and out.skipped == []
    manifest = read_manifest(open_storage(runs), "tiny-set")
    assert manifest == json.loads(json.dumps(out.manifest))
    assert manifest["intervals"] == [0, 50, 100]
    highs = [e["model"]["arch"]["high"] for e in manifest["experts"]]
    assert highs[0][0] == pytest.approx(0.5) and highs[1][0] == pytest.approx(1 / 3, abs=1e-5)   # the ramp
    for entry in manifest["experts"]:
        with open(entry["checkpoint"], "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == entry["sha256"]
        assert entry["params"] > 0 and entry["macs"] > 0
    client = MlflowClient(out.tracking_uri)
    parent = client.get_run(out.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["denoiselab.run_name"] == "tiny-set"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{out.run_id}'")
    assert sorted(r.data.tags["denoiselab.run_name"] for r in children) == ["tiny-set-expert0", "tiny-set-expert1"]
    (a, b) = sorted(children, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time, "the two expert runs did not overlap"
    p = {r.data.tags["denoiselab.run_name"]: float(r.data.metrics["meme/p"]) for r in children}
    assert p == {"tiny-set-expert0": 0.8, "tiny-set-expert1": 0.4}              # the decreasing schedule


def test_the_set_samples_evaluates_and_costs_through_the_router(expert_set, tmp_path, capsys):
    runs = expert_set["runs"]
    assert main(["sample", "tiny-set", "--n", "8", "--steps", "3", "--storage", runs,
                 "--out", str(tmp_path / "set.png")]) == 0
    assert "experts.json" in capsys.readouterr().out
    with Image.open(tmp_path / "set.png") as im:
        assert np.asarray(im).std() > 0
    assert main(["evaluate", "tiny-set", "--n", "32", "--steps", "3", "--local", "--storage", runs, "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mlflow_run_id"] == expert_set["out"].run_id and record["metrics"]["fd_digits"] > 0
    cfg_file = tmp_path / "set.yaml"
    import yaml
    cfg_file.write_text(yaml.safe_dump(_set_config(expert_set["root"])))
    assert main(["cost", str(cfg_file), "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert [e["model"] for e in cost["experts"]] == ["UNet-N", "UNet-N"]
    assert sum(e["sampling_steps"] for e in cost["experts"]) == 3 == cost["sampling_steps"]
    assert cost["baseline"]["model"] == "UNet-T" and cost["baseline"]["params_ratio"] > 3


def test_rerunning_trains_only_unfinished_experts(expert_set, capsys):
    root, runs = expert_set["root"], expert_set["runs"]
    shutil.rmtree(os.path.join(runs, "tiny-set-expert1"))                   # expert 1 lost its run
    out = run_experts(ExpertsRequest(load_config(_set_config(root)), quiet=True))
    assert out.skipped == [0] and out.trained == [1]
    assert main(["experts", os.path.join(runs, "..", "none.yaml")]) == 2      # a missing file: one line
    assert "config file not found" in capsys.readouterr().err


def test_a_tiny_expert_set_study_trains_and_scores_a_whole_set(local_ray, tmp_path):
    from search.command import SearchRequest, run_search
    from search.config import study_from_dict
    base = _set_config(tmp_path, eval={"n": 16, "steps": 2})
    base.pop("name")
    study = study_from_dict({"name": "tiny-experts", "base": base, "metric": "fd_digits", "mode": "min",
                             "budget": {"trials": 1}, "concurrency": 1, "scheduler": "none",
                             "sampler": {"kind": "random"}, "output": str(tmp_path / "study"),
                             "space": {"meme": {"count": 2, "soft": ["hard", "decreasing"]}}})
    outcome = run_search(SearchRequest(study, quiet=True))
    assert [r.status for r in outcome.records] == ["finished"]
    assert all(r.value is not None and r.value > 0 for r in outcome.records)
    assert outcome.best is not None
    for record in outcome.records:                                          # each trial trained a whole set
        manifest = read_manifest(open_storage(str(tmp_path / "runs")), record.run_name)
        assert [e["run"] for e in manifest["experts"]] == [f"{record.run_name}-expert0", f"{record.run_name}-expert1"]
