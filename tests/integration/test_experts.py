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


def test_the_negative_transfer_report_compares_a_run_with_single_interval_models(expert_set, tmp_path, capsys):
    """`denoiselab transfer` of expert 0 (trained on both intervals, mostly its own: soft sampling)
    against the set: on interval 0 it meets itself, so with the same images, timesteps and noise
    for every model the gap there is exactly 0; next to a real `denoiselab affinity` heatmap, and
    logged to expert 0's MLflow run."""
    from orchestrator.infra.checkpoints import read_checkpoint, resolve_checkpoint
    from orchestrator.jobs.transfer import TransferRequest, _subset, interval_losses, run_transfer
    from trainers.build import network_from_state
    from trainers.methods.intervals import Intervals
    from trainers.errors import ConfigError
    root, runs = expert_set["root"], expert_set["runs"]
    assert main(["affinity", "tiny-set-expert0", "--out", str(tmp_path / "tas"), "--stride", "25", "--n", "8",
                 "--batch", "8", "--dim", "64", "--count", "2", "--storage", runs]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["transfer", "tiny-set-expert0", "--singles", "tiny-set", "--affinity",
                 str(tmp_path / "tas" / "tas.npz"), "--n", "16", "--storage", runs, "--out", str(out),
                 "--tracking-uri", f"sqlite:///{root}/mlflow.db"]) == 0
    printed = capsys.readouterr().out
    assert "negative transfer (run worse than the single-interval model) on intervals:" in printed
    report = json.loads((out / "transfer.json").read_text())
    assert report["intervals"] == [0, 50, 100] and len(report["gaps"]) == 2
    first, second = report["gaps"]
    assert first["gap"] == 0.0 and first["multi"] == first["single"] > 0          # the same model, same noise
    assert second["multi"] > 0 and second["single"] > 0 and second["gap"] == pytest.approx(
        second["multi"] - second["single"])
    assert report["negative_transfer"] == ([1] if second["gap"] > 0 else [])
    assert report["affinity_intervals"][0] == 0 and report["affinity_intervals"][-1] == 100
    with Image.open(out / "transfer.png") as im:
        assert np.asarray(im).std() > 0
    expert1 = read_checkpoint(resolve_checkpoint("tiny-set-expert1", open_storage(runs)))
    net, diffusion, cfg, _ = network_from_state(expert1)
    again = interval_losses(net, diffusion, Intervals.from_list([0, 50, 100]), _subset(cfg, 16, 0))
    assert second["single"] == pytest.approx(again[1], rel=1e-6)                # its own loss on its interval
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             filter_string="tags.`denoiselab.run_name` = 'tiny-set-expert0'")[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "transfer")} == {
        "transfer/transfer.json", "transfer/transfer.png"}
    with pytest.raises(ConfigError, match=r"^--singles tiny-set-expert1: not an expert set"):
        run_transfer(TransferRequest("tiny-set-expert0", "tiny-set-expert1", str(out), storage=runs))
    assert main(["transfer", "tiny-set", "--singles", "tiny-set", "--storage", runs, "--out", str(out)]) == 2
    assert "tiny-set: is an expert set; the first argument is the multi-task run" in capsys.readouterr().err
