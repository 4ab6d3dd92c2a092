"""``denoiselab transfer``: the negative-transfer report (ANT, Go et al. 2023, observations O1/O2).

ANT's premise is that denoising tasks at different noise levels conflict: a model trained on every
timestep does worse on some intervals than a model trained on that interval alone (negative
transfer, O1), and the conflict is larger between distant timesteps (O2, the task-affinity matrix).
This report puts both pieces of evidence side by side for one multi-task run:

* the **per-interval loss gap**: the multi-task model's denoising loss on interval k minus the
  loss of a single-interval model trained only on interval k (an expert set trained with
  ``methods.meme: {identical: true, soft: hard}``, one expert per interval, same architecture),
  all scored on the same fixed images, timesteps and noise (``trainers.heldout``). A positive gap
  on an interval is negative transfer there; a negative gap is positive transfer;
* the **task-affinity heatmap** (``denoiselab affinity``'s ``tas.npz``) with the run's interval
  boundaries drawn on it, and the boundaries the affinity DP chose.

Outputs ``transfer.png`` and ``transfer.json`` in ``--out``, and the same files as artifacts
``transfer/`` of the multi-task run's MLflow run when a tracking store is given.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainers.errors import ConfigError

__all__ = ["TransferRequest", "run_transfer", "interval_losses", "loss_gaps"]


@dataclass(frozen=True)
class TransferRequest:
    run: str                                 # the multi-task run: name, checkpoint directory or state.pt
    singles: str                             # an expert set whose experts each trained on one interval
    out: str = "transfer"                    # local directory for transfer.png / transfer.json
    affinity: Optional[str] = None           # tas.npz from `denoiselab affinity`
    n: int = 512                             # images scored per interval
    seed: int = 0                            # which images
    storage: str = "./runs"
    endpoint: Optional[str] = None
    tracking_uri: Optional[str] = None       # log the report to the run's MLflow run


def interval_losses(model: torch.nn.Module, diffusion, intervals, data) -> list[float]:
    """Per-interval loss (ε-MSE + vb) on ``data`` with the fixed held-out noise (same for every model)."""
    from trainers.heldout import heldout_losses
    scores = heldout_losses(model, diffusion, intervals, data, torch.device("cpu"))
    return [scores[f"heldout/interval_{k}"] for k in range(intervals.num_intervals)]


def loss_gaps(multi: list[float], single: list[float]) -> list[dict]:
    """Per interval: both losses, the gap (multi - single) and the gap relative to the single loss."""
    return [{"interval": k, "multi": m, "single": s, "gap": m - s, "relative_gap": (m - s) / s if s else float("nan")}
            for k, (m, s) in enumerate(zip(multi, single))]


def _subset(cfg, n: int, seed: int):
    from trainers.data import ArrayDataset, builtin_dataset
    if cfg.data.name not in ("digits", "shapes"):
        raise ConfigError(f"transfer: run data {cfg.data.name!r}; the report scores built-in data sets (digits, "
                          f"shapes) so far")
    data = builtin_dataset(cfg.data)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return ArrayDataset(data.images[idx], None if data.labels is None else data.labels[idx], data.num_classes)


def run_transfer(req: TransferRequest) -> dict:
    from orchestrator.infra.checkpoints import read_checkpoint, resolve_checkpoint
    from orchestrator.infra.storage import open_storage
    from trainers.build import network_from_state
    from trainers.methods.intervals import Intervals
    if req.n < 1:
        raise ConfigError("--n: must be >= 1 image per interval")
    runs = open_storage(req.storage, req.endpoint)
    multi_state = read_checkpoint(resolve_checkpoint(req.run, runs, req.endpoint))
    if multi_state.get("kind") == "expert_set":
        raise ConfigError(f"{req.run}: is an expert set; the first argument is the multi-task run (one model)")
    set_state = read_checkpoint(resolve_checkpoint(req.singles, runs, req.endpoint))
    if set_state.get("kind") != "expert_set":
        raise ConfigError(f"--singles {req.singles}: not an expert set; train the single-interval models with "
                          f"`denoiselab experts` (methods.meme: {{identical: true, soft: hard}})")
    model, diffusion, cfg, _ = network_from_state(multi_state)
    intervals = Intervals.from_list(set_state["intervals"])
    experts = [network_from_state(s) for s in set_state["experts"]]
    for k, (_, their_diffusion, their_cfg, _) in enumerate(experts):
        if their_cfg.diffusion != cfg.diffusion:
            raise ConfigError(f"--singles {req.singles}: expert {k} was trained with {their_cfg.diffusion}, the run "
                              f"with {cfg.diffusion}; the losses are comparable only under one diffusion process")
    torch.manual_seed(req.seed)
    data = _subset(cfg, req.n, req.seed)
    multi = interval_losses(model, diffusion, intervals, data)
    single = [interval_losses(net, diff, intervals, data)[k] for k, (net, diff, _, _) in enumerate(experts)]
    gaps = loss_gaps(multi, single)
    tas, tas_bounds = _affinity(req.affinity)
    result = {"run": req.run, "singles": req.singles, "images": len(data.images), "intervals": intervals.to_list(),
              "run_intervals": multi_state["intervals"], "gaps": gaps,
              "negative_transfer": [g["interval"] for g in gaps if g["gap"] > 0],
              "affinity": req.affinity, "affinity_intervals": tas_bounds}
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "transfer.json", "png": out / "transfer.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    from orchestrator.review.transfer_plot import transfer_figure
    transfer_figure(gaps, tas, multi_state["intervals"], tas_bounds,
                    title=f"{req.run}: multi-task vs single-interval models").savefig(paths["png"], dpi=110)
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    if req.tracking_uri:
        result["logged_to"] = _log(req, cfg, paths)
    return result


def _affinity(path: Optional[str]):
    if not path:
        return None, None
    from trainers.build import read_affinity
    return read_affinity(path, "--affinity")


def _log(req: TransferRequest, cfg, paths: dict) -> Optional[str]:
    """The report as artifacts ``transfer/`` of the run's MLflow run (found by run name)."""
    from mlflow.tracking import MlflowClient
    from orchestrator.infra.tracking import RUN_NAME_TAG, check_tracking
    check_tracking(req.tracking_uri)
    client = MlflowClient(req.tracking_uri)
    name = cfg.name or req.run
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    if not found:
        return None
    for path in paths.values():
        client.log_artifact(found[0].info.run_id, str(path), artifact_path="transfer")
    return found[0].info.run_id
