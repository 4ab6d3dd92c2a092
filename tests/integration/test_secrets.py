"""No credential leaks: a search whose trial is a Ray Train run with an evaluation of its
checkpoint (a Ray task), run with sentinel values for the AWS keys, the session token and the MLflow password (a basic-auth
``mlflow server``); then every output is scanned for them - the console, Ray's session logs
(runtime environments included), the MLflow server's store, artifacts and log, the study's
directory (Optuna, Tune state, best.yaml), DENOISELAB_HOME, and every object the runs wrote to S3."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import ray_run_dict
from tests.integration.conftest import MlflowServer, list_keys

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SENTINELS = {"AWS_ACCESS_KEY_ID": "AKIASENTINEL7QX2ZK", "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-9d41f7",
             "AWS_SESSION_TOKEN": "sentinel-session-token-5be2", "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-pw-31c8"}


def _scan(blobs: dict[str, bytes]) -> list[str]:
    return [f"{where}: {name}" for where, data in blobs.items() for name, value in SENTINELS.items()
            if value.encode() in data]


def test_search_and_evaluation_leak_no_credential(s3, tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/auth.db\n"
                                   f"admin_username = admin\nadmin_password = {SENTINELS['MLFLOW_TRACKING_PASSWORD']}\n"
                                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server = MlflowServer(root, "--app-name", "basic-auth", "--artifacts-destination", str(root / "artifacts"),
                          env={"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
                               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-flask-key"}).start()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))            # short: Ray's socket paths
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, **SENTINELS, "MLFLOW_TRACKING_USERNAME": "admin", "RAY_TMPDIR": str(ray_tmp),
           "DENOISELAB_HOME": str(tmp_path / "home"), "DENOISELAB_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    base = ray_run_dict(train={"steps": 10, "checkpoint_every": 5, "log_every": 5}, sample={"n": 4, "steps": 3},
                        eval={"n": 32, "steps": 3},                   # the trial's checkpoint is evaluated too
                        storage={"path": "s3://denoiselab/secrets", "endpoint": s3["endpoint"]},
                        tracking={"uri": server.uri, "experiment": "secrets"})
    (work / "study.yaml").write_text(yaml.safe_dump({"name": "leak", "base": base, "budget": {"trials": 1},
                                                     "scheduler": "none", "sampler": "grid",
                                                     "space": {"optim": {"lr": {"choices": [1e-3]}}}}))
    try:
        search = subprocess.run([sys.executable, "-m", "orchestrator", "search", "study.yaml"], cwd=work, env=env,
                                capture_output=True, timeout=600)
        assert search.returncode == 0, search.stderr[-3000:]
        evaluations = [k for k in list_keys(s3, "secrets/") if "/denoiselab/eval/" in k and k.endswith(".json")]
        assert evaluations, "the trial's checkpoint was not evaluated"
    finally:
        server.stop()
    blobs = {"search console": search.stdout + search.stderr}
    for folder in (tmp_path, ray_tmp):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.name != "auth.ini":
                blobs[str(path)] = path.read_bytes()
    objects = list_keys(s3, "secrets/")
    for key in objects:
        blobs[f"s3://denoiselab/{key}"] = s3["client"].get_object(Bucket="denoiselab", Key=key)["Body"].read()
    ray_logs = [p for p in blobs if "/logs/" in p and p.startswith(str(ray_tmp))]
    assert any(p.endswith("runtime_env_agent.log") for p in ray_logs), "Ray's logs were not where the scan looked"
    assert any(p.endswith("server.db") for p in blobs) and len(objects) > 10
    leaks = _scan(blobs)
    print(f"scanned {len(blobs)} outputs ({len(ray_logs)} Ray log files, {len(objects)} S3 objects, "
          f"{sum(len(b) for b in blobs.values()) / 1e6:.1f} MB) for {len(SENTINELS)} secrets: {len(leaks)} leaks")
    assert not leaks, "credentials found in: " + "; ".join(leaks[:10])
