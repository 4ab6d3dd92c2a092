"""MLflow: experiment and run bookkeeping on the driver, rank-0 logging in workers.

* The tracking URI is ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default
  ``sqlite:///mlflow.db`` in the working directory (made absolute so Ray workers, whose cwd
  differs, write the same file).
* The experiment and the run are created once, on the driver (concurrent creation races on
  sqlite; docs/platform.md, "MLflow"). The run is found again by the tag ``denoiselab.run_name``, so a resumed
  run appends to the same MLflow run.
* Workers buffer per-step metrics and commit them with each checkpoint; a restarted worker logs
  only the steps after the checkpoint it resumed from, so the history has no gaps and no
  duplicates. A run name is matched together with its storage location, and a run that starts
  fresh (no checkpoint) under a reused name gets a new MLflow run (the old one is marked replaced).
* An unreachable server never stops training: metrics stay in memory and are sent when it
  answers again; after ``tracking.retry_seconds`` (and at the end of the run) they are written
  to a spool under the run's storage (``NAME/denoiselab/spool/*.jsonl``), which is replayed into
  the run when the server is back, on the next resume, or by ``denoiselab replay NAME``.
* Non-zero ranks get :class:`NullTracker`.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.infra.retry import first_line
from trainers.errors import UserError

__all__ = ["TrackingError", "resolve_tracking_uri", "check_tracking", "ensure_experiment", "find_or_create_run",
           "log_params", "WorkerTracker", "NullTracker", "RUN_NAME_TAG", "STORAGE_TAG", "safe_params", "MetricSpool",
           "replay_spool", "quick_http_failures", "points_to_jsonl",
           "points_from_jsonl", "Point"]

RUN_NAME_TAG = "denoiselab.run_name"
STUDY_TAG = "denoiselab.study"              # a study's parent run: the study name
STORAGE_TAG = "denoiselab.storage_uri"
SPOOL_PARTS = ("denoiselab", "spool")
_SECRET = re.compile(r"(secret|password|token|access_key|credential)", re.IGNORECASE)


class TrackingError(UserError):
    """The tracking store is unreachable or refuses the request."""


def resolve_tracking_uri(uri: Optional[str]) -> str:
    from trainers.config import check_no_password
    check_no_password(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
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


_SQLITE_READY: set[str] = set()


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    if not uri.startswith("sqlite:///") or uri in _SQLITE_READY:
        return MlflowClient(tracking_uri=uri)
    # A new sqlite store is created and migrated by the first process that opens it; several
    # processes doing that at once corrupt the migration (mlflow #4353). One at a time, then.
    import fcntl
    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    _SQLITE_READY.add(uri)
    return client


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``, creating it once (driver only). The first call a command makes
    to the store: a refusal (no or wrong credentials) ends here in one line."""
    from mlflow.exceptions import MlflowException
    client = _client(uri)
    try:
        exp = client.get_experiment_by_name(name)
    except MlflowException as err:
        text = str(err)
        if any(code in text for code in ("401", "403", "not authenticated", "Permission denied")):
            raise TrackingError(f"tracking.uri: {uri} refused the request ({'HTTP 403' if '403' in text else 'HTTP 401'}"
                                f"); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                                f"MLFLOW_TRACKING_TOKEN) for a user allowed to write") from None
        raise TrackingError(f"tracking.uri: {uri} failed: {first_line(err)}") from None
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def find_or_create_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
                       parent_run_id: Optional[str] = None, fresh: bool = False) -> tuple[str, bool]:
    """(run_id, resumed). A run is identified by its denoiselab run name and, when ``tags`` name
    one, its storage location. ``fresh``: the run starts from no checkpoint, so an MLflow run found
    under the name belongs to an earlier run (storage wiped): it is marked replaced, not appended to."""
    client = _client(uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=20, order_by=["attributes.start_time DESC"])
    storage = tags.get(STORAGE_TAG)
    found = [r for r in found if storage is None or r.data.tags.get(STORAGE_TAG, storage) == storage]
    if found and not fresh:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    for old in found:                                 # fresh start under a reused name
        client.set_tag(old.info.run_id, "denoiselab.replaced_run_name", run_name)
        client.delete_tag(old.info.run_id, RUN_NAME_TAG)
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
    committed = 0

    def add(self, step: int, metrics: dict[str, float]) -> None: ...
    def logged_step(self, key: str = "loss") -> int: return 0
    def detach(self) -> list: return []
    def send(self, batch: list) -> None: ...
    def flush(self) -> None: ...
    def artifact(self, name: str, data: bytes) -> None: ...
    def tag(self, key: str, value: str) -> None: ...
    def close(self) -> None: ...


Point = tuple[str, float, int, int]          # (key, value, timestamp ms, step)


def points_to_jsonl(points: list[Point], run_id: Optional[str] = None) -> bytes:
    extra = {"run_id": run_id} if run_id else {}
    return "".join(json.dumps({**extra, "key": k, "value": v, "timestamp": ts, "step": step}) + "\n"
                   for k, v, ts, step in points).encode()


def points_from_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


class MetricSpool:
    """Metric points that could not reach the tracking server, as JSON lines under the run's
    storage: ``NAME/denoiselab/spool/metrics-<time>-<id>.jsonl``."""

    def __init__(self, storage, run_name: str):
        self.storage, self.run_name = storage, run_name

    def write(self, run_id: str, points: list[Point]) -> str:
        name = f"metrics-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.jsonl"
        return self.storage.write_bytes(points_to_jsonl(points, run_id), self.run_name, *SPOOL_PARTS, name)

    def files(self) -> list[str]:
        return [f for f in self.storage.listdir(self.run_name, *SPOOL_PARTS) if f.endswith(".jsonl")]

    def read(self, name: str) -> list[dict]:
        return points_from_jsonl(self.storage.read_bytes(self.run_name, *SPOOL_PARTS, name))

    def remove(self, name: str) -> None:
        self.storage.fs.delete_file(self.storage.path(self.run_name, *SPOOL_PARTS, name))


def replay_spool(spool: MetricSpool, uri: str) -> int:
    """Send every spooled point to its run and delete the file it came from; the number sent."""
    from mlflow.entities import Metric
    client, sent = _client(uri), 0
    for name in spool.files():
        rows = spool.read(name)
        by_run: dict[str, list] = {}
        for r in rows:
            by_run.setdefault(r["run_id"], []).append(Metric(r["key"], float(r["value"]), int(r["timestamp"]),
                                                             int(r["step"])))
        for run_id, points in by_run.items():
            for i in range(0, len(points), 1000):
                client.log_batch(run_id, metrics=points[i:i + 1000])
        spool.remove(name)
        sent += len(rows)
    return sent


def quick_http_failures() -> None:
    """MLflow's client retries a dead server for minutes by default (7 retries, backoff factor 2);
    the tracker has its own patience (``tracking.retry_seconds``), so one call fails in seconds."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import logging
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)   # our one line says it instead


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class WorkerTracker:
    """Rank-0 MLflow logging for one run: buffered metrics committed with checkpoints.

    ``committed``: the step of the checkpoint this worker resumed from (0 for a fresh run); points
    at or below it are already in the run. ``spool``: where points go when the server stays away
    longer than ``retry_seconds`` (None: they stay in memory)."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool = False, *, committed: int = 0,
                 spool: Optional[MetricSpool] = None, retry_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = _say):
        quick_http_failures()
        self.client, self.run_id, self.uri = _client(uri), run_id, uri
        self.buffer: list[tuple[int, dict[str, float], int]] = []
        self.pending: list[tuple[str, float, int, int]] = []        # (key, value, timestamp ms, step)
        self.committed, self.spool, self.retry_seconds = committed, spool, retry_seconds
        self.clock, self.say = clock, say
        self.lock = threading.RLock()
        self.down_since: Optional[float] = None
        self.spooled = 0
        self.monitor = None
        if system_metrics:
            self._start_system_metrics()

    def logged_step(self, key: str = "loss") -> int:
        """The last step of ``key`` already in the run (0 when the server cannot say)."""
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception:  # noqa: BLE001 - an outage: the caller keeps its own estimate
            return 0

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            self.monitor = SystemMetricsMonitor(self.run_id)
            self.monitor.start()
        except Exception:  # noqa: BLE001 - optional (psutil/nvml); training goes on without it
            self.monitor = None

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.committed:
            self.buffer.append((step, dict(metrics), int(time.time() * 1000)))

    def detach(self) -> list[tuple[str, float, int, int]]:
        """The buffered points as one batch, to be sent once their checkpoint is in storage."""
        batch = [(k, float(v), ts, step) for step, m, ts in self.buffer for k, v in m.items()
                 if isinstance(v, (int, float))]
        if self.buffer:
            self.committed = max(self.committed, max(s for s, _, _ in self.buffer))
        self.buffer.clear()
        return batch

    def send(self, batch: list[tuple[str, float, int, int]]) -> None:
        """Send a batch (from any thread): now, or held until the server answers again."""
        with self.lock:
            self.pending.extend(batch)
            self._send()

    def flush(self) -> None:
        self.send(self.detach())

    def _send(self) -> None:
        from mlflow.entities import Metric
        try:
            while self.pending:
                chunk = self.pending[:1000]
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in chunk])
                del self.pending[:len(chunk)]
        except Exception as err:  # noqa: BLE001 - a tracking outage must not stop training
            self._unreachable(err)
            return
        if self.down_since is not None:
            self.say(f"denoiselab: tracking server {self.uri} answers again after "
                     f"{self.clock() - self.down_since:.0f} s; held metrics sent")
            self.down_since = None
        if self.spooled:
            self._replay()

    def _unreachable(self, err: Exception) -> None:
        now = self.clock()
        if self.down_since is None:
            self.down_since = now
            self.say(f"denoiselab: tracking server {self.uri} unreachable ({first_line(err)}); training goes on, "
                     f"metrics are held for up to tracking.retry_seconds={self.retry_seconds:g}")
        if now - self.down_since >= self.retry_seconds:
            self._spool()

    def _spool(self) -> None:
        if not self.pending or self.spool is None:
            return
        try:
            where = self.spool.write(self.run_id, self.pending)
        except Exception as err:  # noqa: BLE001 - keep them in memory then
            self.say(f"denoiselab: could not spool metrics either ({first_line(err)}); they stay in memory")
            return
        self.say(f"denoiselab: {len(self.pending)} metric points spooled to {where}; they are sent when the "
                 f"server answers again (or run `denoiselab replay {self.spool.run_name}`)")
        self.spooled += len(self.pending)
        self.pending.clear()

    def _replay(self) -> None:
        try:
            sent = replay_spool(self.spool, self.uri)
        except Exception as err:  # noqa: BLE001 - the spool stays for `denoiselab replay`
            self.say(f"denoiselab: spooled metrics not replayed yet ({first_line(err)})")
            return
        self.spooled = 0
        if sent:
            self.say(f"denoiselab: {sent} spooled metric points replayed into the run")

    def artifact(self, name: str, data: bytes) -> None:
        directory, filename = os.path.split(name)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / filename
                path.write_bytes(data)
                self.client.log_artifact(self.run_id, str(path), artifact_path=directory or None)
        except Exception as err:  # noqa: BLE001 - artifacts are also written to the run's storage
            self.say(f"denoiselab: artifact {name} not logged to MLflow ({first_line(err)}); it is in the run's "
                     f"storage")

    def tag(self, key: str, value: str) -> None:
        try:
            self.client.set_tag(self.run_id, key, value)
        except Exception as err:  # noqa: BLE001 - tags are informational
            if self.down_since is None:                  # an outage is reported once, by the metrics
                self.say(f"denoiselab: tag {key} not set ({first_line(err)})")

    def close(self) -> None:
        """Send what is left; what still cannot be sent goes to the spool (nothing is dropped)."""
        self.flush()
        with self.lock:
            if self.pending:
                self._spool()
        if self.monitor is not None:
            self.monitor.finish()
