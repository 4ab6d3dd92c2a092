"""Reporter for Ray Train workers: checkpoints through ``ray.train.report`` into storage, metrics
to MLflow from rank 0 (committed with each checkpoint), artifacts to MLflow and storage.

Every rank calls ``ray.train.report`` at the same steps (it is a barrier, ≈2 s at the default
health-check interval: never every step; docs/platform.md, "Ray Train"); only rank 0 attaches a checkpoint.
With an ``AsyncEvaluator`` (rank 0, ``eval.n > 0``), due checkpoints also start an evaluation of
their EMA weights as a Ray task; finished ones are collected at each checkpoint without blocking,
and the rest at ``close`` (``orchestrator/jobs/evaluation.py``).
"""
from __future__ import annotations

import json
import tempfile
from typing import Optional

from orchestrator.infra.storage import Storage
from trainers.checkpoint import save_state
from trainers.reporting import ProgressLine, checkpoint_dir_name

__all__ = ["RayReporter"]


class RayReporter:
    def __init__(self, tracker, storage: Storage, run_name: str, is_main: bool,
                 progress: Optional[ProgressLine] = None, evaluator=None):
        self.tracker, self.storage, self.run_name = tracker, storage, run_name
        self.is_main, self.progress, self.evaluator = is_main, progress, evaluator

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
        with tempfile.TemporaryDirectory() as tmp:
            save_state(tmp, state)
            self.tracker.flush()
            self.tracker.tag("checkpoint.latest", self.storage.uri_of(self.run_name, name))
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(tmp),  # RAY
                             checkpoint_dir_name=name)
        if self.evaluator is not None:
            if self.evaluator.due(step):
                self.evaluator.submit(step, state, self.storage.uri_of(self.run_name, name))
            self.evaluator.poll()

    def artifact(self, name: str, data: bytes) -> None:
        if not self.is_main:
            return
        self.tracker.artifact(name, data)
        self.storage.write_bytes(data, self.run_name, "denoiselab", "artifacts", name)
        if name.startswith("summaries/") and name.endswith(".json"):     # a method's summary: also as a picture
            from orchestrator.review.plots import figure_png, summary_heatmaps
            fig = summary_heatmaps([(self.run_name, json.loads(data))])
            if fig is not None:
                self.artifact(f"plots/{name[len('summaries/'):-5]}.png", figure_png(fig))

    def close(self, summary: dict) -> None:
        if self.evaluator is not None:
            self.evaluator.drain()
        self.tracker.flush()
        self.tracker.close()
        if self.progress is not None:
            self.progress.close()
