"""The per-worker training function: the trainers loop, run under Ray Train.

Ray-specific lines are few and marked ``# RAY``. Nothing here reads files that exist only on the
driver's disk: built-in data is generated on the worker, Parquet data streams through Ray Data,
checkpoints come from storage through ``ray.train.get_checkpoint()``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Optional

import torch

from orchestrator.infra.checkpoints import complete_state, newest_usable, read_base
from orchestrator.infra.data_io import decode_batch
from orchestrator.infra.latents import draw_latents
from orchestrator.infra.storage import open_storage
from orchestrator.infra.tracking import MetricSpool, NullTracker, WorkerTracker, points_from_jsonl
from orchestrator.runs.reporter import RayReporter
from orchestrator.runs.runtime import ray_runtime
from trainers.build import resume_check
from trainers.checkpoint import METRICS_FILE, state_from_bytes
from trainers.config import load_config
from trainers.data import training_batches
from trainers.loop import train
from trainers.methods import Intervals
from trainers.reporting import ProgressLine, checkpoint_dir_name

__all__ = ["train_loop_per_worker", "RayDataBatches", "LatentBatches"]


class RayDataBatches:
    """Local batches from this worker's Ray Data shard, epoch after epoch.

    Streaming order is Ray Data's, so a resumed run continues with a fresh epoch rather than at
    the exact row (the built-in sets resume at the exact data position)."""

    def __init__(self, shard, meta: dict, local_batch: int):
        self.shard, self.meta, self.local_batch = shard, meta, local_batch
        self.num_classes, self.image_size, self.channels = meta["num_classes"], meta["image_size"], meta["channels"]
        self._it = None

    def rows(self, batch: dict, step: int):
        return decode_batch(batch["image"], batch.get("label"), self.meta)

    def _epoch(self):
        return self.shard.iter_batches(batch_size=self.local_batch, batch_format="numpy", drop_last=True)

    def get(self, step: int):
        for _ in range(2):
            if self._it is None:
                self._it = iter(self._epoch())
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            return self.rows(batch, step)
        raise RuntimeError("data: the Ray Data shard yields no full batch; use a smaller train.batch_size")


class DataAudit:
    """Fingerprints of the first ``limit`` rows a rank trains on, written to
    ``NAME/denoiselab/data_audit/rank_R.json``: evidence that ranks see disjoint data."""

    def __init__(self, inner, limit: int = 256):
        self.inner, self.limit, self.digests = inner, limit, []
        self.num_classes, self.image_size, self.channels = inner.num_classes, inner.image_size, inner.channels
        self.heldout = getattr(inner, "heldout", None)
        self.decode = getattr(inner, "decode", None)

    def get(self, step: int):
        x0, y = self.inner.get(step)
        if len(self.digests) < self.limit:
            rows = x0[: self.limit - len(self.digests)].numpy()
            self.digests.extend(hashlib.sha1(r.tobytes()).hexdigest()[:16] for r in rows)
        return x0, y

    def write(self, storage, run_name: str, rank: int) -> None:
        body = json.dumps({"rank": rank, "rows": len(self.digests), "digests": self.digests})
        storage.write_bytes(body.encode(), run_name, "denoiselab", "data_audit", f"rank_{rank}.json")


class LatentBatches(RayDataBatches):
    """Latent rows -> model-space latents drawn from the stored posterior (``orchestrator/infra/
    latents.py``), ε seeded by (seed, step, rank); ``decode`` turns the loop's sample grids into
    images."""

    def __init__(self, shard, meta: dict, local_batch: int, seed: int, rank: int, flip: bool, decode=None):
        super().__init__(shard, meta, local_batch)
        self.seed, self.rank, self.flip, self.decode = seed, rank, flip, decode

    def rows(self, batch: dict, step: int):
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 4_099 + self.rank)
        return draw_latents(batch, self.meta, gen, self.flip)


def _batches(cfg, payload: dict, rank: int, world: int):
    if not cfg.data.stored:
        return training_batches(cfg, rank, world)
    import ray.train                                                      # RAY
    shard = ray.train.get_dataset_shard("train")                          # RAY
    if cfg.data.name == "latents":
        return LatentBatches(shard, payload["data_meta"], cfg.local_batch_size, cfg.train.seed, rank, cfg.data.flip,
                             payload.get("decoder") if rank == 0 else None)
    return RayDataBatches(shard, payload["data_meta"], cfg.local_batch_size)


def _resume_state(cfg, storage, run_name: str, batches, loud: bool) -> tuple[Optional[dict], list]:
    """The newest stored checkpoint of this run that verifies (``infra/checkpoints.py``); a damaged
    one (truncated, missing, another model's) is skipped for the one before it."""
    import ray.train                                                      # RAY
    checkpoint = ray.train.get_checkpoint()                               # RAY: a hint; storage decides
    ray_latest = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else None
    check = resume_check(cfg, image_size=batches.image_size, channels=batches.channels,
                         num_classes=batches.num_classes)
    return newest_usable(storage, run_name, ray_latest, check,
                         warn=lambda line: print(line, file=sys.stderr, flush=True) if loud else None)


def stored_points(storage, run_name: str, up_to: int) -> list:
    """The metric points stored with the run's checkpoints up to step ``up_to``. Re-sending them
    on resume is idempotent (MLflow keeps one copy of an identical point) and fills the gap a
    worker leaves when it dies between storing a checkpoint and sending its metrics."""
    points = []
    for step in storage.listdir(run_name):
        if step.startswith("step_") and step <= checkpoint_dir_name(up_to) and storage.exists(run_name, step,
                                                                                                METRICS_FILE):
            points += [(p["key"], float(p["value"]), int(p["timestamp"]), int(p["step"]))
                       for p in points_from_jsonl(storage.read_bytes(run_name, step, METRICS_FILE))]
    return points


def _initial_weights(cfg, payload: dict, resume: Optional[dict]) -> tuple[Optional[dict], Optional[dict]]:
    """(init state, base reference): the base a patch references (verified by hash, also on
    resume, where the checkpoint holds only the patch), or ``init_from`` on a new run."""
    endpoint, region = cfg.storage.endpoint, cfg.storage.region
    if resume is not None:
        return (read_base(resume["base"], endpoint, region), resume["base"]) if resume.get("base") else (None, None)
    if not payload.get("init_from"):
        return None, None
    src = payload["init_from"]
    base_ref = payload.get("base_ref")
    if base_ref is not None:
        return read_base(base_ref, endpoint, region), base_ref
    data = open_storage(src["storage"], endpoint, region).read_bytes(*src["parts"])
    return complete_state(state_from_bytes(data, src["uri"]), endpoint, region), None


def _quiet_ray_train_logs() -> None:
    """Ray Train's per-report INFO line (a dump of every metric) is logged under the module's file
    path rather than ``ray.train``, so ``LoggingConfig`` does not reach it: silence it unless
    ``--verbose`` (Ray's log files keep it)."""
    if os.environ.get("DENOISELAB_VERBOSE"):
        return
    try:
        from ray.train.v2._internal.execution import context                # RAY
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    stamps = {"worker_start": time.time()}
    _quiet_ray_train_logs()
    torch.set_num_threads(max(1, int(payload.get("threads", 1))))
    cfg = load_config(payload["config"])
    runtime = ray_runtime()
    run_name = payload["run_name"]
    storage = open_storage(cfg.storage.path, cfg.storage.endpoint, cfg.storage.region)
    batches = DataAudit(_batches(cfg, payload, runtime.rank, runtime.world_size))
    resume, skipped = _resume_state(cfg, storage, run_name, batches, runtime.is_main)
    tracker = (WorkerTracker(payload["tracking_uri"], payload["run_id"], cfg.tracking.system_metrics,
                             committed=int(resume["step"]) if resume else 0, spool=MetricSpool(storage, run_name),
                             retry_seconds=cfg.tracking.retry_seconds)
               if runtime.is_main else NullTracker())
    if skipped:            # steps re-trained past a damaged checkpoint were logged before: not again
        tracker.committed = max(tracker.committed, tracker.logged_step())
    if resume is not None and runtime.is_main:          # a restart (worker or node lost, re-run): say so
        print(f"denoiselab: {run_name} resumes from step {resume['step']}", file=sys.stderr, flush=True)
        tracker.tag("denoiselab.resumed_from_step", str(resume["step"]))
        tracker.send(stored_points(storage, run_name, int(resume["step"])))
    progress = ProgressLine(cfg.train.steps, every=1) if runtime.is_main else None
    evaluator = None
    if runtime.is_main and cfg.eval.n > 0 and payload.get("evaluate", True):
        from orchestrator.jobs.evaluation import AsyncEvaluator
        evaluator = AsyncEvaluator(cfg, payload["tracking_uri"], payload["run_id"], storage, run_name,
                                   decoder=payload.get("decoder"))
    reporter = RayReporter(tracker, storage, run_name, runtime.is_main, progress, evaluator,
                           retry_seconds=cfg.storage.retry_seconds, stamps=stamps)
    init, base_ref = _initial_weights(cfg, payload, resume)
    train(cfg, runtime, reporter, batches, resume=resume, init=init, base_ref=base_ref,
          intervals=Intervals.from_list(payload["intervals"]))
    batches.write(storage, run_name, runtime.rank)
