"""Multi-node on one host: ``ray.cluster_utils.Cluster`` with a head and two worker nodes on
127.0.0.1, workers spread across the nodes, checkpoints and Parquet data in a moto S3 bucket, and
one node lost mid-run."""
from __future__ import annotations

import json

import pytest

from orchestrator.infra.data_io import write_dataset
from orchestrator.infra.session import worker_env
from orchestrator.runs.driver import TrainRequest, run_training
from orchestrator.infra.storage import StorageError, open_storage
from tests.helpers import free_port, ray_run_dict
from tests.integration.conftest import list_keys
from trainers.config import DataConfig, load_config
from trainers.data import builtin_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(s3):
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    # every worker's State API points at this cluster's dashboard, as connect_ray does for a local
    # instance, so Train V2's placement-group cleaner never picks another Ray instance on this host
    port = free_port()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": port})
    nodes = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR",
             runtime_env={"env_vars": {**worker_env(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_two_nodes_s3_parquet(cluster, s3, tmp_path):
    import ray.util.state
    data = builtin_dataset(DataConfig(name="digits"))
    write_dataset(data, open_storage("s3://denoiselab/data/digits", s3["endpoint"]), shard_size=200)
    cfg = load_config(ray_run_dict(
        name="two-nodes", data={"name": "parquet", "path": "s3://denoiselab/data/digits"},
        scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
        storage={"path": "s3://denoiselab/mn", "endpoint": s3["endpoint"]},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "mn"}))
    out = run_training(TrainRequest(cfg, quiet=True))
    workers = ray.util.state.list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "RayTrainWorker")])
    assert len({w.node_id for w in workers}) == 2, "the two workers must run on different nodes"
    keys = list_keys(s3, "mn/two-nodes/")
    assert "mn/two-nodes/step_00000020/state.pt" in keys and "mn/two-nodes/checkpoint_manager_snapshot.json" in keys
    storage = open_storage("s3://denoiselab/mn", s3["endpoint"])
    audits = [json.loads(storage.read_bytes("two-nodes", "denoiselab", "data_audit", f"rank_{r}.json")) for r in (0, 1)]
    assert audits[0]["rows"] > 0 and audits[1]["rows"] > 0
    # Ray Data splits the Parquet rows between the workers: at most a few duplicate digit images overlap
    assert len(set(audits[0]["digests"]) & set(audits[1]["digests"])) <= 3
    assert out.checkpoint_uri == "s3://denoiselab/mn/two-nodes/step_00000020"


def test_local_storage_refused_on_multi_node(cluster, tmp_path):
    cfg = load_config(ray_run_dict(name="local-mn", storage={"path": str(tmp_path / "runs")},
                                  tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    with pytest.raises(StorageError, match="multi-node runs need shared object storage"):
        run_training(TrainRequest(cfg, quiet=True))


def test_node_lost_mid_run_resumes_on_the_remaining_node(cluster, s3, tmp_path):
    """Runs last in this module: it removes one of the two worker nodes. Both workers start on
    different nodes; once a checkpoint is stored one node is removed (its raylet and workers die);
    Ray Train restarts the worker group on the remaining node's CPUs from the stored checkpoint.
    (Built-in data: with Parquet, Ray Data's readers would need a third CPU on that node.)"""
    import threading
    import ray
    from mlflow.tracking import MlflowClient
    from tests.helpers import wait_for
    from trainers.checkpoint import state_from_bytes
    c, nodes = cluster
    cfg = load_config(ray_run_dict(
        name="node-loss", train={"steps": 60, "checkpoint_every": 10, "log_every": 5},
        scaling={"num_workers": 2, "placement_strategy": "SPREAD", "max_failures": 2},
        storage={"path": "s3://denoiselab/mn", "endpoint": s3["endpoint"]},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "mn"}))
    removed: list[str] = []

    def lose_a_node() -> None:
        wait_for(lambda: "mn/node-loss/step_00000020/state.pt.sha256" in list_keys(s3, "mn/node-loss/"), 180, 0.2,
                 "a stored checkpoint")
        c.remove_node(nodes[1], allow_graceful=False)
        removed.append(nodes[1].node_id)
    thread = threading.Thread(target=lose_a_node, daemon=True)
    thread.start()
    out = run_training(TrainRequest(cfg, quiet=True))
    thread.join(10)
    assert removed, "the node was never removed"
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2                 # the head and one worker node
    client = MlflowClient(out.tracking_uri)
    assert int(client.get_run(out.run_id).data.tags["denoiselab.resumed_from_step"]) >= 20
    assert sorted(m.step for m in client.get_metric_history(out.run_id, "loss")) == list(range(5, 61, 5))
    storage = open_storage("s3://denoiselab/mn", s3["endpoint"])
    assert state_from_bytes(storage.read_bytes("node-loss", "step_00000060", "state.pt"))["step"] == 60
