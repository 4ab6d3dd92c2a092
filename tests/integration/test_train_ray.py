"""Training through Ray Train on a real local Ray instance: 2 gloo workers, S3 checkpoints on a
moto server, MLflow on sqlite and on a real ``mlflow server``. (A killed worker, a lost node and
storage/tracking outages: test_search.py, test_multinode.py, test_faults.py.)"""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.runs.driver import TrainRequest, run_training
from tests.helpers import ray_run_dict
from tests.integration.conftest import list_keys
from trainers.checkpoint import state_from_bytes
from trainers.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _history(uri: str, run_id: str, key: str = "loss") -> list:
    return MlflowClient(uri).get_metric_history(run_id, key)


def test_two_gloo_workers_local_storage(local_ray, tmp_path):
    cfg = load_config(ray_run_dict(name="two-workers", train={"steps": 40, "batch_size": 32},
                                  scaling={"num_workers": 2},
                                  storage={"path": str(tmp_path / "runs")},
                                  tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "it"}))
    out = run_training(TrainRequest(cfg, quiet=True))
    run_dir = tmp_path / "runs" / "two-workers"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000020", "step_00000030", "step_00000040"]
    state = state_from_bytes((run_dir / "step_00000040" / "state.pt").read_bytes())
    assert state["step"] == 40 and state["config"]["scaling"]["num_workers"] == 2
    losses = [m.value for m in sorted(_history(out.tracking_uri, out.run_id), key=lambda m: m.step)]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    audits = [json.loads((run_dir / "denoiselab" / "data_audit" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    seen0, seen1 = set(audits[0]["digests"]), set(audits[1]["digests"])
    assert audits[0]["rows"] == audits[1]["rows"] > 0
    # digits has a few exact duplicate images; distinct positions must still not be shared wholesale
    assert len(seen0 & seen1) <= 2
    run = MlflowClient(out.tracking_uri).get_run(out.run_id)
    assert run.data.params["train.steps"] == "40" and run.data.params["plan.methods"] == "vanilla"
    assert run.data.tags["checkpoint.final"].endswith("two-workers/step_00000040")
    assert run.info.status == "FINISHED"
    t = out.timings                                   # the summary's phases, also logged as time/* metrics
    assert set(t) == {"ray_s", "workers_s", "setup_s", "train_s", "eval_s", "total_s"}
    assert all(v >= 0 for v in t.values()) and t["train_s"] > 0
    assert t["total_s"] >= t["workers_s"] + t["setup_s"] + t["train_s"] + t["eval_s"]
    assert run.data.metrics["time/train_s"] == pytest.approx(t["train_s"])


def test_mlflow_server_with_proxied_artifacts(local_ray, s3, mlflow_server, tmp_path):
    cfg = load_config(ray_run_dict(name="server-run", storage={"path": "s3://denoiselab/srv", "endpoint": s3["endpoint"]},
                                  tracking={"uri": mlflow_server, "experiment": "server"}))
    out = run_training(TrainRequest(cfg, quiet=True, register="tiny-digits"))
    client = MlflowClient(mlflow_server)
    run = client.get_run(out.run_id)
    assert run.data.params["model.name"] == "DiT-N/2"
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(run.data.params) and "testing-secret" not in json.dumps(run.data.params)
    assert run.data.tags["checkpoint.latest"] == "s3://denoiselab/srv/server-run/step_00000020"
    assert [m.step for m in client.get_metric_history(out.run_id, "loss")] == [5, 10, 15, 20]
    keys = list_keys(s3, "mlflow-artifacts/")
    assert any(k.endswith("samples/final.png") for k in keys), keys
    versions = client.search_model_versions("name='tiny-digits'")
    assert versions and versions[0].tags["checkpoint_uri"].endswith("server-run/step_00000020")


def test_stored_data_needs_a_cpu_for_ray_data(local_ray):
    """Workers holding every CPU would starve Ray Data's readers (training would hang): refused."""
    from orchestrator.runs.driver import _check_data_cpus
    from trainers.errors import ConfigError
    total = int(local_ray.cluster_resources()["CPU"])
    cfg = load_config({"data": {"name": "parquet", "path": "/nowhere"},
                       "scaling": {"num_workers": 2, "cpus_per_worker": total / 2}})
    with pytest.raises(ConfigError, match="Ray Data needs one to stream data.path; lower scaling.cpus_per_worker"):
        _check_data_cpus(cfg)
    _check_data_cpus(load_config({"data": {"name": "parquet", "path": "/nowhere"},
                                  "scaling": {"num_workers": 2, "cpus_per_worker": (total - 1) / 2}}))
    _check_data_cpus(load_config({"scaling": {"num_workers": 2, "cpus_per_worker": total / 2}}))   # built-in data


def test_gpu_requested_on_a_local_instance_without_gpus_is_refused(local_ray):
    from orchestrator.runs.driver import _check_gpus
    from trainers.errors import ConfigError
    if local_ray.cluster_resources().get("GPU", 0):
        pytest.skip("the local instance has GPUs")
    with pytest.raises(ConfigError, match="scaling.use_gpu: this machine has no GPU that Ray can see"):
        _check_gpus(load_config({"scaling": {"use_gpu": True}}), None)
    _check_gpus(load_config({"scaling": {"use_gpu": False}}), None)
