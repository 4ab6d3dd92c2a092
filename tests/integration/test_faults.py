"""Faults during a real Ray Train run: the S3 endpoint and the MLflow server go away mid-run and
come back on the same port; outages longer than the retry budgets; a damaged latest checkpoint.

Services: the session's moto S3 server behind a loopback forwarder (``outage.TcpProxy``) and an
``mlflow server`` subprocess that is stopped and started again (its sqlite store survives).
Every wait is bounded."""
from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli.main import main
from orchestrator.infra.storage import StorageError, open_storage
from orchestrator.runs.driver import TrainRequest, run_training
from tests.helpers import ray_run_dict, wait_for
from tests.integration.conftest import MlflowServer, list_keys
from tests.integration.outage import TcpProxy
from trainers.checkpoint import CHECKSUM_FILE, STATE_FILE, state_from_bytes, verify_checksum
from trainers.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def services(s3, tmp_path_factory):
    proxy = TcpProxy(int(s3["endpoint"].rsplit(":", 1)[1])).start()
    server = MlflowServer(tmp_path_factory.mktemp("faults-mlflow")).start()
    yield {"proxy": proxy, "server": server, "s3": s3}
    proxy.stop()
    server.stop()


def _config(services, name: str, steps: int, every: int, **extra) -> dict:
    return ray_run_dict(name=name, train={"steps": steps, "checkpoint_every": every, "log_every": 10,
                                          "keep_checkpoints": 100},
                        sample={"n": 0}, scaling={"max_failures": 0},
                        storage={"path": "s3://denoiselab/faults", "endpoint": services["proxy"].endpoint,
                                 **extra.get("storage", {})},
                        tracking={"uri": services["server"].uri, "experiment": "faults", **extra.get("tracking", {})})


def _stored_steps(s3, name: str) -> list[int]:
    keys = list_keys(s3, f"faults/{name}/")
    return sorted(int(k.split("/")[-2][5:]) for k in keys if k.endswith(f"/{CHECKSUM_FILE}"))


def _check_every_checkpoint(s3, name: str, expected: list[int]) -> None:
    storage = open_storage("s3://denoiselab/faults", s3["endpoint"])
    assert _stored_steps(s3, name) == expected
    for step in expected:
        d = f"step_{step:08d}"
        data = storage.read_bytes(name, d, STATE_FILE)
        verify_checksum(data, storage.read_bytes(name, d, CHECKSUM_FILE).decode(), d)
        assert state_from_bytes(data, d)["step"] == step


def _loss_steps(uri: str, run_id: str) -> list:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss"))


def test_storage_and_tracking_outages_mid_run_lose_nothing(local_ray, services, capfd):
    """The MLflow server goes down for 30 s at the first stored checkpoint, and 12 s later the S3
    endpoint for 20 s, while the run trains on. The tracker's patience (tracking.retry_seconds=3)
    runs out while storage is still up, so held metrics go to the spool; they are replayed once
    the server is back - by the run itself, or (when the run ended first) by `denoiselab replay`.
    (Metrics are sent after their checkpoint is stored, so the tracking outage must start first
    to be seen while storage is up.)"""
    s3, proxy, server = services["s3"], services["proxy"], services["server"]
    cfg = load_config(_config(services, "outage", steps=1600, every=100, tracking={"retry_seconds": 3}))
    window: dict[str, float] = {}

    def outage() -> None:
        wait_for(lambda: _stored_steps(s3, "outage"), 180, 0.2, "the first checkpoint")
        window["tracking_down"] = time.time()
        server.stop()
        time.sleep(12)
        window["start"] = time.time()
        proxy.stop()
        time.sleep(max(0.0, window["tracking_down"] + 30 - time.time()))
        server.start()
        time.sleep(max(0.0, window["start"] + 20 - time.time()))
        proxy.start()
        window["s3_back"] = window["end"] = time.time()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    out = run_training(TrainRequest(cfg, quiet=True))
    thread.join(120)
    assert "end" in window, "the outage never ran"
    said = "\n".join(line for line in capfd.readouterr().err.splitlines() if "denoiselab:" in line)
    if "replayed into the run" not in said:         # the run ended first: the spool waits for `replay`
        assert main(["replay", "outage", "--storage", "s3://denoiselab/faults", "--endpoint", s3["endpoint"],
                     "--tracking-uri", server.uri]) == 0
        said += capfd.readouterr().out
    _check_every_checkpoint(s3, "outage", list(range(100, 1601, 100)))
    history = MlflowClient(out.tracking_uri).get_metric_history(out.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(10, 1601, 10)), "gaps or duplicates in the loss history"
    during = [m for m in history if window["start"] * 1000 < m.timestamp < window["s3_back"] * 1000]
    assert during, "no training step happened while storage was down"
    assert "retrying for up to 900 s" in said and "succeeded after" in said, said
    assert "unreachable" in said and "spooled to" in said and ("replayed into the run" in said or
                                                               "metric points from" in said), said
    assert not [k for k in list_keys(s3, "faults/outage/") if "/spool/" in k and not k.endswith("/")]
    print(f"outage: {len(during)} loss points logged (timestamps) while S3 was down; {len(history)} points in all")


def test_storage_outage_beyond_the_budget_stops_cleanly_and_the_rerun_recovers(local_ray, services, capfd):
    """Storage away longer than storage.retry_seconds: one clear error. The re-run skips the
    truncated newest checkpoint, resumes from the one before, and the history has each step once."""
    s3, proxy = services["s3"], services["proxy"]
    raw = _config(services, "budget", steps=300, every=100, storage={"retry_seconds": 3})
    cut: dict[str, bool] = {}

    def outage() -> None:
        wait_for(lambda: len(_stored_steps(s3, "budget")) >= 2, 180, 0.2, "two stored checkpoints")
        proxy.stop()
        cut["done"] = True

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    with pytest.raises(StorageError, match=r"(could not be uploaded|stayed unreachable) .*storage.retry_seconds=3"):
        run_training(TrainRequest(load_config(raw), quiet=True))
    thread.join(60)
    assert cut.get("done")
    proxy.start()
    stored = _stored_steps(s3, "budget")
    assert 200 <= stored[-1] < 300
    latest = f"faults/budget/step_{stored[-1]:08d}/{STATE_FILE}"
    body = s3["client"].get_object(Bucket="denoiselab", Key=latest)["Body"].read()
    s3["client"].put_object(Bucket="denoiselab", Key=latest, Body=body[: len(body) // 3])   # truncated
    capfd.readouterr()
    out = run_training(TrainRequest(load_config(raw), quiet=True))
    said = "\n".join(line for line in capfd.readouterr().err.splitlines() if "denoiselab:" in line)
    assert f"step_{stored[-1]:08d} is unusable" in said and "checksum mismatch" in said, said
    assert f"resumes from step {stored[-2]}" in said, said
    assert _loss_steps(out.tracking_uri, out.run_id) == list(range(10, 301, 10))
    _check_every_checkpoint(s3, "budget", list(range(100, 301, 100)))
