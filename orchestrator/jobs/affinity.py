"""``denoiselab affinity``: the ANT task-affinity matrix as a Ray job.

Timesteps of the grid are split across Ray tasks; each task rebuilds the network from a
checkpoint (shipped through the object store), computes sketched per-timestep gradients on a
fixed, seeded data subset and returns them. The driver forms the cosine matrix per checkpoint,
averages over checkpoints, interpolates to T×T and runs the interval DP. The artifact
``tas.npz`` (keys: tas, grid, tas_grid, bounds) is written to storage (and MLflow when asked);
``intervals: {rule: affinity, artifact: <uri>}`` in a run config uses it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from orchestrator.infra.checkpoints import read_checkpoint, resolve_checkpoint
from orchestrator.infra.storage import open_storage
from trainers.data import builtin_dataset
from trainers.errors import ConfigError
from trainers.methods.affinity import CountSketch, cosine_matrix, interpolate_matrix, timestep_grid
from trainers.methods.intervals import resolve_intervals

__all__ = ["AffinityRequest", "run_affinity", "affinity_chunk"]


@dataclass(frozen=True)
class AffinityRequest:
    checkpoints: tuple[str, ...]
    out: str                        # directory or s3:// prefix for tas.npz
    stride: int = 50
    num_images: int = 256
    batch: int = 128
    dim: int = 4096                 # count-sketch size; 0 = full gradients
    count: int = 5                  # intervals for the partition stored with the artifact
    workers: int = 2
    seed: int = 0
    storage: str = "./runs"
    endpoint: Optional[str] = None
    tracking_uri: Optional[str] = None   # log tas.npz to MLflow too (experiment "denoiselab-affinity")


def affinity_chunk(state: dict, timesteps: list[int], num_images: int, batch: int, dim: int, seed: int) -> np.ndarray:
    """Runs inside a Ray task: sketched gradients for some timesteps of one checkpoint."""
    from orchestrator.jobs.sampling import model_from_state
    from trainers.methods.affinity import timestep_gradients
    torch.set_num_threads(1)
    model, diffusion, cfg, _ = model_from_state(state, use_ema=True)
    model.train().requires_grad_(True)
    data = builtin_dataset(cfg.data)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:num_images]
    sketch = CountSketch(sum(p.numel() for p in model.parameters()), dim, seed)
    grads = timestep_gradients(model, diffusion, data.images[idx], None if data.labels is None else data.labels[idx],
                               timesteps, batch=batch, seed=seed, sketch=sketch)
    return grads.numpy()


def run_affinity(req: AffinityRequest, address: Optional[str] = None) -> dict:
    import ray
    from orchestrator.infra.session import connect_ray
    runs = open_storage(req.storage, req.endpoint)
    states = [read_checkpoint(resolve_checkpoint(ref, runs, req.endpoint)) for ref in req.checkpoints]
    cfgs = {(s["config"]["diffusion"]["schedule"], s["config"]["diffusion"]["steps"]) for s in states}
    if len(cfgs) != 1:
        raise ConfigError("affinity: checkpoints come from different diffusion schedules; pass checkpoints of one run")
    if states[0]["config"]["data"]["name"] not in ("digits", "shapes"):
        raise ConfigError("affinity: only runs on built-in data (digits, shapes) are supported so far")
    schedule, steps = cfgs.pop()
    grid = timestep_grid(steps, req.stride)
    connect_ray(address)
    task = ray.remote(num_cpus=1)(affinity_chunk)
    matrices = []
    for state in states:
        ref = ray.put(state)
        chunks = [list(map(int, c)) for c in np.array_split(grid, min(req.workers, len(grid)))]
        parts = ray.get([task.remote(ref, c, req.num_images, req.batch, req.dim, req.seed) for c in chunks])
        matrices.append(cosine_matrix(torch.from_numpy(np.concatenate(parts))))
    tas_grid = np.mean(matrices, axis=0)
    tas = interpolate_matrix(grid.astype(np.float64), tas_grid, steps)
    np.fill_diagonal(tas, 1.0)      # a task's affinity with itself is 1; interpolation would blur it
    intervals, cost = resolve_intervals("affinity", steps, req.count, tas=tas)
    buf = io.BytesIO()
    np.savez_compressed(buf, tas=tas, grid=grid, tas_grid=tas_grid, bounds=np.asarray(intervals.to_list()))
    uri = open_storage(req.out, req.endpoint).write_bytes(buf.getvalue(), "tas.npz")
    if req.tracking_uri:
        _log_mlflow(req, buf.getvalue(), intervals.pairs())
    return {"artifact": uri, "intervals": [list(p) for p in intervals.pairs()], "cost": float(cost),
            "grid_points": int(len(grid)), "checkpoints": len(states), "schedule": schedule, "steps": steps}


def _log_mlflow(req: AffinityRequest, data: bytes, pairs) -> None:
    import hashlib
    from orchestrator.infra.tracking import WorkerTracker, ensure_experiment, find_or_create_run, log_params
    exp = ensure_experiment(req.tracking_uri, "denoiselab-affinity")
    name = "affinity-" + hashlib.sha1(repr(req).encode()).hexdigest()[:10]
    run_id, _ = find_or_create_run(req.tracking_uri, exp, name, {"denoiselab.job": "affinity"})
    log_params(req.tracking_uri, run_id, {"checkpoints": ",".join(req.checkpoints), "stride": req.stride,
                                          "num_images": req.num_images, "dim": req.dim, "count": req.count,
                                          "intervals": str(pairs), "out": req.out})
    WorkerTracker(req.tracking_uri, run_id).artifact("tas.npz", data)
