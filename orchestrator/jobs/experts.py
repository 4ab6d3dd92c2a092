"""``denoiselab experts CONFIG``: train a MEME expert set as parallel Ray Train runs.

The set config (``methods.meme`` without ``expert``) expands into N expert run configs
(``trainers/methods/meme.py``). Each unfinished expert is trained by its own Ray Train run,
launched from a Ray task so the runs proceed concurrently as far as the cluster has room (their
worker groups queue for resources otherwise); each has its own checkpoints and is a child MLflow
run of the set's parent run. Re-running the command resumes unfinished experts only (Ray Train
resumes each by name) and skips the finished ones. At the end the manifest
``<storage>/<set>/denoiselab/experts.json`` records the intervals, each expert's architecture,
checkpoint URI and SHA-256, and its cost; it also goes to the parent run.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from orchestrator.infra.checkpoints import EXPERT_SET_MANIFEST as MANIFEST
from orchestrator.infra.checkpoints import latest_step, sha256
from orchestrator.infra.session import connect_ray
from orchestrator.infra.storage import Storage
from orchestrator.infra.tracking import ensure_experiment, find_or_create_run, log_params
from trainers.build import resolve_run_intervals
from trainers.checkpoint import STATE_FILE
from trainers.config import RunConfig, load_config
from trainers.configlib import flatten
from trainers.methods.meme import expert_configs
from trainers.reporting import checkpoint_dir_name

__all__ = ["ExpertsRequest", "ExpertSetOutcome", "run_experts", "read_manifest"]


@dataclass(frozen=True)
class ExpertsRequest:
    config: RunConfig
    address: Optional[str] = None
    parent_run_id: Optional[str] = None      # a study's parent run, for set trials
    quiet: bool = False


@dataclass
class ExpertSetOutcome:
    name: str
    run_id: str
    tracking_uri: str
    manifest_uri: str
    manifest: dict
    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def _finished(storage: Storage, cfg: RunConfig) -> bool:
    return latest_step(storage, cfg.name) == checkpoint_dir_name(cfg.train.steps)


def _train_expert(data: dict, parent_run_id: str, quiet: bool) -> dict:
    """Ray task body: one expert's Ray Train run (Ray is already connected in a task)."""
    from orchestrator.runs.driver import TrainRequest, run_training
    # the experts of a set queue for the cluster's CPUs by design (each fits alone: checked before
    # Ray starts), so a waiting expert's worker group must not time out after Ray's 60 s and
    # print a controller traceback per retry; Ray Train hands this variable to the run's controller
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(24 * 3600))
    out = run_training(TrainRequest(load_config(data), parent_run_id=parent_run_id, quiet=quiet))
    return {"run": out.run_name, "run_id": out.run_id, "checkpoint": out.checkpoint_uri}


def _manifest(cfg: RunConfig, experts: list[RunConfig], storage: Storage) -> dict:
    from orchestrator.infra.data_io import run_geometry
    from trainers.cost import run_cost
    intervals, _ = resolve_run_intervals(experts[0])
    channels, size, classes = run_geometry(cfg)
    entries = []
    for n, (expert, (lo, hi)) in enumerate(zip(experts, intervals.pairs())):
        step = latest_step(storage, expert.name)
        data = storage.read_bytes(expert.name, step, STATE_FILE)
        cost = run_cost(expert, channels=channels, image_size=size, num_classes=classes)
        entries.append({"index": n, "run": expert.name, "interval": [lo, hi],
                        "model": {"name": expert.model.name, "arch": dict(expert.model.arch)},
                        "checkpoint": storage.uri_of(expert.name, step, STATE_FILE), "sha256": sha256(data),
                        "params": cost.params, "macs": cost.macs})
    return {"format": 1, "kind": "expert_set", "name": cfg.name, "intervals": intervals.to_list(),
            "config": cfg.to_dict(), "experts": entries}


def read_manifest(storage: Storage, name: str) -> dict:
    return json.loads(storage.read_bytes(name, *MANIFEST))


def run_experts(req: ExpertsRequest) -> ExpertSetOutcome:
    """Train (or resume) every unfinished expert of the set, concurrently; write the manifest."""
    import ray
    from orchestrator.runs.driver import prepare_run, TrainRequest
    cfg = req.config
    experts = expert_configs(cfg)
    preps = [prepare_run(TrainRequest(e)) for e in experts]            # every check before Ray starts
    storage, tracking_uri = preps[0].storage, preps[0].tracking_uri
    experiment = ensure_experiment(tracking_uri, cfg.tracking.experiment)
    parent_id, _ = find_or_create_run(tracking_uri, experiment, cfg.name, {"denoiselab.kind": "expert_set"},
                                      req.parent_run_id)
    log_params(tracking_uri, parent_id, {**flatten(cfg.to_dict()), "experts": len(experts)})
    skipped = [n for n, e in enumerate(experts) if _finished(storage, e)]
    todo = [n for n in range(len(experts)) if n not in skipped]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    client.update_run(parent_id, status="RUNNING")
    if todo:
        connect_ray(req.address)
        if not req.quiet:
            print(f"denoiselab: training experts {todo} of set {cfg.name} ({len(skipped)} finished already)",
                  file=sys.stderr)
        task = ray.remote(_train_expert).options(num_cpus=0, max_retries=0)   # RAY: a driver per expert
        try:
            ray.get([task.remote(experts[n].to_dict(), parent_id, True) for n in todo])
        except KeyboardInterrupt:
            client.set_terminated(parent_id, "KILLED")
            raise
        except BaseException:
            client.set_terminated(parent_id, "FAILED")
            raise
    manifest = _manifest(cfg, experts, storage)
    uri = storage.write_bytes(json.dumps(manifest, indent=1).encode(), cfg.name, *MANIFEST)
    client.log_text(parent_id, json.dumps(manifest, indent=1), "experts.json")
    client.set_tag(parent_id, "checkpoint.final", uri)
    client.set_terminated(parent_id, "FINISHED")
    return ExpertSetOutcome(cfg.name, parent_id, tracking_uri, uri, manifest, todo, skipped)
