"""Real services on loopback for the integration tests: a moto S3 server, a local Ray instance,
and (where a server is the subject) an ``mlflow server`` subprocess. Started and stopped here."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from tests.helpers import free_port, wait_for

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")   # report barrier 2 s -> 0.2 s (tests only)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the shared instance and every CLI the tests start run as a user's embedded instance does: no
# preemption watcher, usage report or metrics collection, process stats once a minute
from orchestrator.infra.session import EMBEDDED_DEFAULTS  # noqa: E402

for _var, _value in EMBEDDED_DEFAULTS.items():
    os.environ.setdefault(_var, _value)
AWS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value-xyz",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server (real HTTP endpoint) with a bucket ``denoiselab``."""
    from moto.server import ThreadedMotoServer
    import boto3
    os.environ.update(AWS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="denoiselab")
    yield {"endpoint": endpoint, "client": client, "bucket": "denoiselab"}
    server.stop()


_SHARED_RAY: dict = {}


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the shared local Ray instance down at the end of the session."""
    yield _SHARED_RAY
    import ray
    if _SHARED_RAY and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(s3, _ray_session):
    """One local Ray instance shared by the modules that use it: started on first use (its
    processes inherit the s3 fixture's credentials, as a node's would), with a pinned dashboard
    that every worker's State API points at (Train V2's placement-group cleaner must not find
    another local instance on this host). A module that needs another instance (the multi-node
    Cluster) shuts it down; the next user starts it again."""
    import ray
    from orchestrator.infra.session import worker_env
    shared = _ray_session
    if not (ray.is_initialized() and shared.get("address") == ray.get_runtime_context().gcs_address):
        if ray.is_initialized():
            ray.shutdown()
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_port=port, logging_level="ERROR",
                 runtime_env={"env_vars": {**worker_env(), "RAY_API_SERVER_ADDRESS": api}})
        shared.update(address=ray.get_runtime_context().gcs_address, api=api)
    yield ray


def list_keys(s3, prefix: str) -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# MLflow 3.x starts eight job-runner processes (huey) with every server, ~24 s of CPU on this
# machine; denoiselab submits no server-side jobs
JOBS_OFF = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """An ``mlflow server`` subprocess on a fixed loopback port (sqlite store under ``root``) that a
    test can stop and start again on the same port (the store survives: an outage, not a reset)."""

    def __init__(self, root: Path, *args: str, env: Optional[dict] = None):
        self.root, self.args, self.env = root, args, env or {}
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> "MlflowServer":
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri",
                                      f"sqlite:///{self.root}/server.db", *self.args, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--workers", "1"],
                                     env={**os.environ, **JOBS_OFF, **self.env},
                                     stdout=open(self.root / "server.log", "a"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.healthy, 90, 0.25, "mlflow server")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        import signal
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)          # the server and its uvicorn worker
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
        wait_for(lambda: not self.healthy(), 10, 0.2, "mlflow server to stop")


@contextlib.contextmanager
def running_mlflow_server(root: Path, *args: str, env: Optional[dict] = None):
    """An ``mlflow server`` subprocess on a free loopback port (sqlite store under ``root``),
    healthy before it is yielded (its URI), stopped afterwards."""
    server = MlflowServer(root, *args, env=env)
    try:
        yield server.start().uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory):
    """``mlflow server`` on sqlite with artifacts proxied to the moto bucket."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), "--artifacts-destination",
                               "s3://denoiselab/mlflow-artifacts", env={"MLFLOW_S3_ENDPOINT_URL": s3["endpoint"]}) as uri:
        yield uri
