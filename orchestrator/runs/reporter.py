"""Reporter for Ray Train workers: checkpoints through ``ray.train.report`` into storage, metrics
to MLflow from rank 0 (committed with each checkpoint), artifacts to MLflow and storage.

Checkpoints are written to local disk and uploaded in the background
(``CheckpointUploadMode.ASYNC``, one upload thread, in order): training goes on while an upload
retries through a storage outage for up to ``storage.retry_seconds`` (:class:`CheckpointUpload`).
A checkpoint counts as reported only once it is in storage, so Ray Train never resumes from one
that is not there; an upload that outlives the budget stops the run with one line.

Every rank calls ``ray.train.report`` at the same steps (it is a barrier, ≈2 s at the default
health-check interval: never every step; docs/platform.md, "Ray Train"); only rank 0 attaches a checkpoint.
With an ``AsyncEvaluator`` (rank 0, ``eval.n > 0``), due checkpoints also start an evaluation of
their EMA weights as a Ray task; finished ones are collected at each checkpoint without blocking,
and the rest at ``close`` (``orchestrator/jobs/evaluation.py``).
"""
from __future__ import annotations

import functools
import json
import os
import posixpath
import tempfile
import threading
import time
from typing import Callable, Optional

from orchestrator.infra.retry import Backoff, first_line, retry_call
from orchestrator.infra.storage import Storage, StorageError
from orchestrator.infra.tracking import points_to_jsonl
from trainers.checkpoint import CHECKSUM_FILE, METRICS_FILE, STATE_FILE, save_state
from trainers.reporting import ProgressLine, checkpoint_dir_name

__all__ = ["RayReporter", "CheckpointUpload"]


class CheckpointUpload:
    """``checkpoint_upload_fn`` for ``ray.train.report``: copies ``state.pt`` and then its checksum
    into the run's directory, retrying with backoff through an outage; ``then()`` runs once the
    checkpoint is stored. ``wait()`` blocks until every upload handed over has ended."""

    def __init__(self, storage: Storage, budget_s: float):
        self.storage, self.backoff = storage, Backoff(budget=budget_s)
        self.in_flight: set[str] = set()
        self.idle = threading.Condition()

    def expect(self, dir_name: str) -> None:
        with self.idle:
            self.in_flight.add(dir_name)

    def wait(self) -> None:
        """Until every expected upload ended (bounded: a report Ray skipped never uploads)."""
        with self.idle:
            self.idle.wait_for(lambda: not self.in_flight, timeout=self.backoff.budget + 120)

    def __call__(self, checkpoint, dir_name: str, then: Optional[Callable[[], None]] = None):
        try:
            stored = self._copy(checkpoint, dir_name)
            if then is not None:
                then()
            return stored
        finally:
            with self.idle:
                self.in_flight.discard(dir_name)
                self.idle.notify_all()

    def _copy(self, checkpoint, dir_name: str):
        import pyarrow.fs as pafs
        import ray.train                                                  # RAY
        context = ray.train.get_context().get_storage()                   # RAY: Ray's own view of the run dir
        dest = posixpath.join(context.experiment_fs_path, dir_name)
        fs = context.storage_filesystem
        raw = getattr(getattr(fs, "handler", None), "inner", fs)          # below the patient wrapper: we retry here

        def copy() -> None:
            raw.create_dir(dest, recursive=True)
            for name in (STATE_FILE, METRICS_FILE, CHECKSUM_FILE):        # the checksum last: it marks completion
                pafs.copy_files(os.path.join(checkpoint.path, name), posixpath.join(dest, name),
                                source_filesystem=checkpoint.filesystem, destination_filesystem=raw)
        try:
            retry_call(copy, self.backoff, f"uploading checkpoint {dir_name} to {self.storage.uri}")
        except OSError as err:
            raise StorageError(f"storage.path: checkpoint {dir_name} could not be uploaded to {self.storage.uri} "
                               f"within storage.retry_seconds={self.backoff.budget:g} ({first_line(err)}); the run "
                               f"stops here - re-run the same command to resume from its last uploaded "
                               f"checkpoint") from None
        return ray.train.Checkpoint(dest, fs)                             # RAY


TIMINGS = ("denoiselab", "timings.json")    # the worker's phase stamps (unix seconds), read by the driver


class RayReporter:
    def __init__(self, tracker, storage: Storage, run_name: str, is_main: bool,
                 progress: Optional[ProgressLine] = None, evaluator=None, retry_seconds: float = 900.0,
                 stamps: Optional[dict] = None):
        self.tracker, self.storage, self.run_name = tracker, storage, run_name
        self.is_main, self.progress, self.evaluator = is_main, progress, evaluator
        self.upload = CheckpointUpload(storage, retry_seconds)
        self.stamps = dict(stamps or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.add(step, metrics)
        if self.is_main and self.progress is not None:
            self.progress.update(step, metrics)

    def checkpoint(self, step: int, state: Optional[dict], metrics: dict[str, float]) -> None:
        import ray.train                                                  # RAY
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        scalars["step"] = float(step)
        name = checkpoint_dir_name(step)
        if state is None:
            ray.train.report(scalars, checkpoint_dir_name=name)          # RAY: barrier on every rank
            return
        local = tempfile.mkdtemp(prefix="denoiselab-checkpoint-")          # removed by Ray after the upload
        batch = self.tracker.detach()             # these points reach MLflow once their checkpoint is stored,
        with open(os.path.join(local, METRICS_FILE), "wb") as fh:   # and travel with it (re-sent on resume)
            fh.write(points_to_jsonl(batch))
        save_state(local, state)

        def uploaded() -> None:
            self.tracker.send(batch)
            self.tracker.tag("checkpoint.latest", self.storage.uri_of(self.run_name, name))
        self.upload.expect(name)
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(local),  # RAY
                         checkpoint_dir_name=name,
                         checkpoint_upload_fn=functools.partial(self.upload, then=uploaded),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
        if self.evaluator is not None:
            if self.evaluator.due(step):
                self.evaluator.submit(step, state, self.storage.uri_of(self.run_name, name))
            self.evaluator.poll()

    def artifact(self, name: str, data: bytes) -> None:
        if not self.is_main:
            return
        self.tracker.artifact(name, data)
        retry_call(lambda: self.storage.write_bytes(data, self.run_name, "denoiselab", "artifacts", name),
                   self.upload.backoff, f"writing artifact {name} to {self.storage.uri}")
        if name.startswith("summaries/") and name.endswith(".json"):     # a method's summary: also as a picture
            from orchestrator.review.plots import figure_png, summary_heatmaps
            fig = summary_heatmaps([(self.run_name, json.loads(data))])
            if fig is not None:
                self.artifact(f"plots/{name[len('summaries/'):-5]}.png", figure_png(fig))

    def close(self, summary: dict) -> None:
        self.stamps.update(train_end=time.time(), train_s=float(summary.get("seconds", 0.0)))
        if self.evaluator is not None:
            self.evaluator.drain()
        self.stamps["eval_end"] = time.time()
        if self.is_main:
            try:
                self.storage.write_bytes(json.dumps(self.stamps).encode(), self.run_name, *TIMINGS)
            except OSError:
                pass                                  # timings are a summary line, never a reason to fail
        self.upload.wait()                        # the last checkpoints' metrics are sent (or spooled) below
        self.tracker.flush()
        self.tracker.close()
        if self.progress is not None:
            self.progress.close()
