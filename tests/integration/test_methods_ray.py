"""The methods end to end on Ray Train (2 gloo workers), the intervals CLI, and the ANT
task-affinity job feeding an ``intervals: {rule: affinity}`` run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.runs.driver import TrainRequest, run_training
from orchestrator.runs.local import train_local
from orchestrator.jobs.affinity import AffinityRequest, run_affinity
from tests.helpers import ray_run_dict
from trainers.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

METHOD_CONFIGS = {          # DTR and the curriculum run inside the combination (the adaptive pacer's
    "ant-pcgrad": {"ant": {"mtl": "pcgrad", "sampling": "iid"}},       # global loss is what needs two ranks)
    "ant-nash": {"ant": {"mtl": "nash", "nash_every": 3}},
    "dtr+ant-uw+curriculum": {"dtr": {}, "ant": {"mtl": "uw"}, "curriculum": {"clusters": 4, "pacing": "adaptive",
                                                                              "patience": 2, "ema": 0.0}},
}


@pytest.mark.parametrize("label", list(METHOD_CONFIGS))
def test_methods_train_on_two_workers(local_ray, tmp_path, label):
    cfg = load_config(ray_run_dict(name=f"m-{label}", methods=METHOD_CONFIGS[label],
                                  scaling={"num_workers": 2}, storage={"path": str(tmp_path / "runs")},
                                  tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "methods"}))
    out = run_training(TrainRequest(cfg, quiet=True))
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["plan.methods"] == "+".join(sorted(
        k if k != "ant" else f"ant-{METHOD_CONFIGS[label]['ant']['mtl']}" for k in METHOD_CONFIGS[label]))
    assert len(client.get_metric_history(out.run_id, "loss")) == 4
    # the easiest interval is always active; with iid sampling a log step may have no sample in it
    assert len(client.get_metric_history(out.run_id, "interval/loss_3")) >= 3
    if "curriculum" in label:
        stages = [m.value for m in sorted(client.get_metric_history(out.run_id, "curriculum/stage"), key=lambda m: m.step)]
        assert max(stages) > 1 and stages == sorted(stages)                  # the adaptive pacer advanced
        plot = tmp_path / "runs" / f"m-{label}" / "denoiselab" / "artifacts" / "plots" / "curriculum_stage.png"
        assert plot.read_bytes()[:4] == b"\x89PNG"
        assert "plots/curriculum_stage.png" in [f.path for f in client.list_artifacts(out.run_id, "plots")]
    if label == "ant-nash":
        assert client.get_metric_history(out.run_id, "nash/alpha_0")


def test_intervals_cli_json_and_plot(tmp_path):
    out = subprocess.run([sys.executable, "-m", "orchestrator", "intervals", "--schedule", "linear", "--rule", "snr",
                          "--count", "5", "--json", "--plot", str(tmp_path / "iv.png")],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["intervals"] == [[0, 1], [1, 2], [2, 5], [5, 18], [18, 1000]]
    assert result["rule"] == "snr" and result["steps"] == 1000 and result["cost"] > 0
    assert (tmp_path / "iv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_affinity_job_feeds_an_affinity_run(local_ray, tmp_path):
    runs = tmp_path / "runs"
    base = ray_run_dict(name="tas-src", storage={"path": str(runs)},
                       tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tas"})
    train_local(load_config(base))                     # the source checkpoint (in-process: the job is the subject)
    result = run_affinity(AffinityRequest(("tas-src",), str(tmp_path / "tas"), stride=20, num_images=32, batch=16,
                                          dim=512, count=3, workers=2, storage=str(runs),
                                          tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    with np.load(tmp_path / "tas" / "tas.npz") as art:
        tas, grid = art["tas"], art["grid"]
    assert tas.shape == (100, 100) and list(grid) == [0, 20, 40, 60, 80, 99]
    assert np.allclose(np.diag(tas), 1.0) and np.allclose(tas, tas.T)
    assert len(result["intervals"]) == 3 and result["intervals"][-1][1] == 100
    cfg = load_config({**base, "name": "tas-user", "intervals": {"rule": "affinity", "count": 3,
                                                                  "artifact": result["artifact"]}})
    out = run_training(TrainRequest(cfg, quiet=True))
    params = MlflowClient(out.tracking_uri).get_run(out.run_id).data.params
    assert params["intervals.resolved"] == str([tuple(p) for p in result["intervals"]])
