"""MLflow: experiment and run bookkeeping on the driver, rank-0 logging in workers.

* The tracking URI is ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default
  ``sqlite:///mlflow.db`` in the working directory (made absolute so Ray workers, whose cwd
  differs, write the same file).
* The experiment and the run are created once, on the driver (concurrent creation races on
  sqlite; docs/platform.md, "MLflow"). The run is found again by the tag ``denoiselab.run_name``, so a resumed
  run appends to the same MLflow run.
* Workers buffer per-step metrics and commit them with each checkpoint; on restart, points at or
  below the last committed step are dropped, so the history has no gaps and no duplicates.
* Non-zero ranks get :class:`NullTracker`.
"""
from __future__ import annotations

import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from trainers.errors import UserError

__all__ = ["TrackingError", "resolve_tracking_uri", "check_tracking", "ensure_experiment", "find_or_create_run",
           "log_params", "WorkerTracker", "NullTracker", "RUN_NAME_TAG", "safe_params"]

RUN_NAME_TAG = "denoiselab.run_name"
_SECRET = re.compile(r"(secret|password|token|access_key|credential)", re.IGNORECASE)


class TrackingError(UserError):
    """The tracking store is unreachable or refuses the request."""


def resolve_tracking_uri(uri: Optional[str]) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        from orchestrator.infra.session import durable_path
        uri = "sqlite:///" + durable_path(uri.removeprefix("sqlite:///"), "tracking.uri")
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        raise TrackingError(f"tracking.uri: {uri!r} is a file store, which MLflow 3 refuses; "
                            f"use sqlite:///mlflow.db or an http(s):// tracking server")
    return uri


def check_tracking(uri: str, timeout: float = 3.0) -> None:
    """Fail within seconds if a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise TrackingError(f"tracking.uri: {uri} answered HTTP {resp.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"tracking.uri: cannot reach the MLflow server at {uri} ({reason}); "
                            f"start it or fix tracking.uri / MLFLOW_TRACKING_URI") from None


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``, creating it once (driver only)."""
    from mlflow.exceptions import MlflowException
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def find_or_create_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
                       parent_run_id: Optional[str] = None) -> tuple[str, bool]:
    """(run_id, resumed). A run is identified by its denoiselab run name."""
    client = _client(uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {RUN_NAME_TAG: run_name, "mlflow.runName": run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id, False


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """Stringified params without anything that looks like a secret."""
    return {k: str(v)[:6000] for k, v in flat.items() if not _SECRET.search(k)}


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    client = _client(uri)
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in safe_params(params).items() if k not in existing]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])


class NullTracker:
    """What non-zero ranks get: every call is a no-op."""
    def add(self, step: int, metrics: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def artifact(self, name: str, data: bytes) -> None: ...
    def tag(self, key: str, value: str) -> None: ...
    def close(self) -> None: ...


class WorkerTracker:
    """Rank-0 MLflow logging for one run: buffered metrics committed with checkpoints."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool = False):
        self.client, self.run_id = _client(uri), run_id
        self.buffer: list[tuple[int, dict[str, float]]] = []
        self.committed = self._last_step()
        self.monitor = None
        if system_metrics:
            self._start_system_metrics()

    def _last_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, "loss")
        return max((m.step for m in history), default=0)

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            self.monitor = SystemMetricsMonitor(self.run_id)
            self.monitor.start()
        except Exception:  # noqa: BLE001 - optional (psutil/nvml); training goes on without it
            self.monitor = None

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.committed:
            self.buffer.append((step, dict(metrics)))

    def flush(self) -> None:
        from mlflow.entities import Metric
        import time
        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for step, m in self.buffer for k, v in m.items()
                  if isinstance(v, (int, float))]
        for i in range(0, len(points), 1000):
            self.client.log_batch(self.run_id, metrics=points[i:i + 1000])
        if self.buffer:
            self.committed = max(self.committed, max(s for s, _ in self.buffer))
        self.buffer.clear()

    def artifact(self, name: str, data: bytes) -> None:
        directory, filename = os.path.split(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), artifact_path=directory or None)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
