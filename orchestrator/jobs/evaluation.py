"""Evaluation of checkpoints: N samples with a fixed seed -> features -> metrics -> MLflow.

Metrics and their names come from ``trainers/eval/suite.py``: ``fd_digits`` / ``fd_shapes``
(Fréchet distance, Heusel et al. 2017 Eq. 6, in the feature space of denoiselab's own small
classifier: NOT FID) plus precision/recall (Kynkäänniemi et al. 2019); ``fid`` / ``is`` only with
Inception-v3 weights the user supplies (``--inception PATH`` or ``$DENOISELAB_INCEPTION``).
Reference statistics of the real data are computed once and cached (``trainers/eval/reference.py``).

Every evaluation of checkpoint ``step_X`` of run ``NAME`` lands in three places: MLflow metrics at
step X of the run tagged ``denoiselab.run_name = NAME``, the run tag ``eval.step_X.nN`` (a JSON
record) and ``NAME/denoiselab/eval/step_X_nN.json`` in the run's storage. Evaluation during
training is asynchronous (``AsyncEvaluator``; docs/platform.md, "Ray Train"): rank 0 ships the EMA weights to a
Ray task at checkpoint time and collects the result at later checkpoints without blocking.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from orchestrator.infra.checkpoints import CheckpointRef, complete_state, read_checkpoint, resolve_checkpoint
from orchestrator.infra.data_io import read_dataset
from orchestrator.jobs.sampling import SampleSpec, sample_images
from orchestrator.infra.storage import Storage, open_storage
from orchestrator.infra.tracking import RUN_NAME_TAG, check_tracking, resolve_tracking_uri
from trainers.config import RunConfig, load_config
from trainers.data import ArrayDataset, builtin_dataset
from trainers.errors import ConfigError
from trainers.eval.reference import cache_root, from_uint8
from trainers.eval.suite import (BUILTIN_SETS, Extractor, builtin_extractor, check_extractor_available,
                                 inception_extractor, reference_for, score_images)
from trainers.reporting import checkpoint_dir_name

__all__ = ["EVAL_SEED", "EvalRecord", "real_data", "extractors_for", "score_samples", "evaluate_state",
           "evaluate_checkpoint", "log_record", "find_run", "final_eval_metrics", "is_eval_metric",
           "inception_path", "check_eval_config", "eval_due", "AsyncEvaluator", "metric_set"]

EVAL_SEED = 0
_EVAL_KEY = re.compile(r"^(fd_[a-z0-9]+|fid|is|is_std|precision_[a-z0-9]+|recall_[a-z0-9]+)$")


def is_eval_metric(key: str) -> bool:
    return bool(_EVAL_KEY.match(key))


def inception_path(explicit: Optional[str] = None) -> Optional[str]:
    return explicit or os.environ.get("DENOISELAB_INCEPTION") or None


def _manifest(cfg: RunConfig) -> dict:
    from orchestrator.infra.data_io import read_metadata
    return read_metadata(open_storage(cfg.data.path, cfg.storage.endpoint, cfg.storage.region))


def metric_set(cfg: RunConfig, meta: Optional[dict] = None) -> str:
    """The data set whose built-in feature network scores this run: its own; for latents, that of
    the images they were encoded from when that is a built-in RGB set at its own size; else the
    data's name (no built-in network: Inception weights or nothing)."""
    if cfg.data.name != "latents":
        return cfg.data.name
    meta = meta or _manifest(cfg)
    src = meta.get("source", {})
    if src.get("kind") == "builtin" and src.get("name") == "shapes" and meta.get("resolution") == src.get("image_size"):
        return "shapes"
    return "latents"


def check_eval_config(cfg: RunConfig, meta: Optional[dict] = None) -> bool:
    """Before any worker starts: an extractor applies and ``eval.n`` can give a covariance. Returns
    whether evaluation runs: a latent run without a feature network gets grids only, and a note."""
    if cfg.eval.n == 1:
        raise ConfigError("eval.n: a Fréchet distance needs at least 2 samples (use hundreds or more); "
                          "0 disables evaluation")
    inception = inception_path()
    if inception and not os.path.isfile(inception):
        raise ConfigError(f"DENOISELAB_INCEPTION: {inception} is not a file; point it at Inception-v3 weights")
    name = metric_set(cfg, meta)
    if name == "latents" and not inception:
        print("denoiselab: note: no metric is available for these latents without Inception weights "
              "(DENOISELAB_INCEPTION=PATH); training writes decoded sample grids only", file=sys.stderr)
        return False
    check_extractor_available(name, inception)
    return True


def real_data(cfg: RunConfig) -> ArrayDataset:
    """The run's real images (built-in sets with their labels; Parquet as stored; for latents the
    images they were encoded from)."""
    if cfg.data.name in BUILTIN_SETS:
        return builtin_dataset(replace(cfg.data, conditional=True))
    if cfg.data.name == "latents":
        from orchestrator.jobs.encode import source_dataset
        return source_dataset(_manifest(cfg), cfg.storage.endpoint, cfg.storage.region)
    return read_dataset(open_storage(cfg.data.path, cfg.storage.endpoint, cfg.storage.region))


def extractors_for(cfg: RunConfig, data: ArrayDataset, inception: Optional[str], cache_dir=None,
                   device: str = "cpu") -> list[Extractor]:
    name = metric_set(cfg)
    check_extractor_available(name, inception)
    cache = cache_root(cache_dir)
    out = []
    if name in BUILTIN_SETS:
        out.append(builtin_extractor(name, data, cache, cfg.data.seed, device))
    if inception:
        out.append(inception_extractor(inception, device))
    return out


def score_samples(cfg: RunConfig, images, inception: Optional[str] = None, cache_dir=None,
                  device: str = "cpu") -> tuple[dict[str, float], list[str]]:
    """Metrics of uint8 [N, H, W, C] samples against the run's real data; (metrics, extractor names)."""
    data = real_data(cfg)
    fake = from_uint8(images)
    metrics: dict[str, float] = {}
    extractors = extractors_for(cfg, data, inception, cache_dir, device)
    for ex in extractors:
        metrics.update(score_images(ex, reference_for(ex, data, cache_root(cache_dir)), fake))
    return metrics, [ex.name for ex in extractors]


@dataclass
class EvalRecord:
    step: int
    n: int
    seed: int
    metrics: dict[str, float]
    sampling: dict = field(default_factory=dict)
    extractors: list[str] = field(default_factory=list)
    checkpoint: Optional[str] = None
    source: str = "evaluate"
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{checkpoint_dir_name(self.step)}_n{self.n}"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate_state(state: dict, n: int, *, seed: int = EVAL_SEED, steps: Optional[int] = None,
                   inception: Optional[str] = None, cache_dir=None, device: str = "cpu", workers: int = 1,
                   local: bool = True, use_ema: bool = True) -> EvalRecord:
    """Sample ``n`` images from ``state`` (fixed seed) and score them."""
    started = time.perf_counter()
    cfg = load_config(state["config"])
    spec = SampleSpec(n=n, seed=seed, steps=steps or cfg.eval.steps, use_ema=use_ema)
    samples = sample_images(state, spec, workers=workers, local=local, device=device,
                            use_gpu=device.startswith("cuda") or None)
    metrics, names = score_samples(cfg, samples.images, inception, cache_dir, device)
    sampling = {k: samples.meta[k] for k in ("sampler", "steps", "guidance", "eta", "weights", "block", "workers")}
    return EvalRecord(int(state.get("step", 0)), n, seed, metrics, sampling, names,
                      seconds=time.perf_counter() - started)


def find_run(tracking_uri: str, run_name: str) -> Optional[str]:
    """The MLflow run id of denoiselab run ``run_name`` (any experiment), newest first."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    found = client.search_runs(experiments, filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def log_record(client, run_id: Optional[str], record: EvalRecord, storage: Optional[Storage] = None,
               run_parts: tuple[str, ...] = ()) -> None:
    """Metrics at the checkpoint's step, a JSON tag on the run, a JSON file beside the checkpoint."""
    body = json.dumps(record.to_dict(), sort_keys=True)
    if client is not None and run_id is not None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, record.step) for k, v in record.metrics.items()])
        client.set_tag(run_id, f"eval.{record.name}", body[:5000])
    if storage is not None:
        storage.write_bytes(body.encode(), *run_parts, "denoiselab", "eval", f"{record.name}.json")


def final_eval_metrics(client, run_id: str) -> dict[str, float]:
    """The latest value of every evaluation metric of a run (what the summary prints)."""
    return {k: v for k, v in client.get_run(run_id).data.metrics.items() if is_eval_metric(k)}


def _run_parts(ref: CheckpointRef) -> tuple[tuple[str, ...], str]:
    """(parts of the run directory under ref.storage, run name) of a checkpoint reference."""
    run_parts = ref.parts[:-2]
    run_dir = ref.storage.path(*run_parts) if run_parts else ref.storage.root
    return run_parts, posixpath.basename(run_dir.rstrip("/"))


def evaluate_checkpoint(ref: str, *, n: int, seed: int = EVAL_SEED, steps: Optional[int] = None,
                        inception: Optional[str] = None, workers: int = 1, local: bool = False,
                        storage: str = "./runs", endpoint: Optional[str] = None,
                        tracking_uri: Optional[str] = None, address: Optional[str] = None,
                        use_ema: bool = True) -> tuple[EvalRecord, Optional[str], str]:
    """``denoiselab evaluate``: (record, MLflow run id or None, run name)."""
    cref = resolve_checkpoint(ref, open_storage(storage, endpoint), endpoint)
    state = read_checkpoint(cref)
    cfg = load_config(state["config"])
    inception = inception_path(inception)
    check_extractor_available(metric_set(cfg), inception)
    if inception and not os.path.isfile(inception):
        raise ConfigError(f"--inception: {inception} is not a file; download the pt_inception-2015-12-05 "
                          f"weights yourself and pass their path (denoiselab never downloads them)")
    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.uri)
    check_tracking(uri)                                            # before minutes of sampling
    if not local:
        from orchestrator.infra.session import connect_ray
        connect_ray(address)
    device = "cuda" if _cuda() else "cpu"
    record = evaluate_state(state, n, seed=seed, steps=steps, inception=inception, workers=workers,
                            local=local, use_ema=use_ema, device=device)
    run_parts, run_name = _run_parts(cref)
    record.checkpoint = cref.uri if cref.parts[-1] == "experts.json" else posixpath.dirname(cref.uri)
    from mlflow.tracking import MlflowClient
    missing = uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///"))
    run_id = None if missing else find_run(uri, run_name)          # never create an empty store
    log_record(MlflowClient(uri) if run_id else None, run_id, record, cref.storage, run_parts)
    return record, run_id, run_name


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def eval_due(step: int, every: int, checkpoint_every: int, total_steps: int) -> bool:
    """Evaluate the checkpoint at ``step``? The final one always; otherwise when a multiple of
    ``every`` lies in (previous checkpoint, step], so ``every`` need not divide into checkpoints.
    Stateless, hence the same after a resume."""
    if step >= total_steps:
        return True
    previous = ((step - 1) // checkpoint_every) * checkpoint_every
    return every > 0 and step // every > previous // every


def _eval_task(state: dict, n: int, seed: int, steps: int, inception: Optional[str], device: str,
               threads: int) -> dict:
    """Ray task body: one evaluation in its own process (local sampling)."""
    import torch
    torch.set_num_threads(max(1, threads))
    return evaluate_state(state, n, seed=seed, steps=steps, inception=inception, device=device).to_dict()


class AsyncEvaluator:
    """Rank 0's evaluations during training, as Ray tasks that never block a training step.

    ``due(step)``: a multiple of ``eval.every`` was crossed since the previous checkpoint, or it is
    the final step (``eval.n > 0``). ``submit`` ships the EMA weights (``ray.put``) to a task;
    ``poll`` collects finished tasks (``ray.wait(timeout=0)``); ``drain`` waits for the rest (at
    close). A failed evaluation is reported as a tag and a warning; training goes on.
    """

    def __init__(self, cfg: RunConfig, tracking_uri: str, run_id: str, storage: Storage, run_name: str,
                 timeout_s: Optional[float] = None, decoder=None):
        self.cfg, self.storage, self.run_name, self.run_id = cfg, storage, run_name, run_id
        self.decoder = decoder                                    # latent runs: shipped with the weights
        self.inception = inception_path()
        check_extractor_available(metric_set(cfg), self.inception)
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri)
        self.timeout_s = float(timeout_s or os.environ.get("DENOISELAB_EVAL_TIMEOUT_S", 3600))
        self.pending: dict = {}                                   # ObjectRef -> (step, checkpoint uri)

    def due(self, step: int) -> bool:
        return eval_due(step, self.cfg.eval.every, self.cfg.train.checkpoint_every, self.cfg.train.steps)

    def _resources(self, final: bool) -> tuple[float, int, str, int]:
        import ray                                                            # RAY
        free = ray.available_resources()
        gpu = 1 if self.cfg.scaling.use_gpu and free.get("GPU", 0) >= 1 else 0
        cpus = 1.0 if free.get("CPU", 0) >= 1 else 0.0    # never wait on CPUs the trainer holds
        threads = max(1, int(self.cfg.scaling.cpus_per_worker)) if final else max(1, int(cpus))
        return cpus, gpu, "cuda" if gpu else "cpu", threads

    def submit(self, step: int, state: dict, checkpoint_uri: str) -> None:
        import ray                                                            # RAY
        from orchestrator.jobs.sampling import slim_state
        cpus, gpu, device, threads = self._resources(final=step >= self.cfg.train.steps)
        task = ray.remote(_eval_task).options(num_cpus=cpus, num_gpus=gpu, scheduling_strategy="DEFAULT",
                                              max_retries=1)
        state = complete_state(state, self.cfg.storage.endpoint, self.cfg.storage.region)   # a patch: + its base
        slim = slim_state(state, use_ema=True)
        if self.decoder is not None:
            slim["decoder"] = self.decoder
        ref = ray.put(slim)                                                   # RAY: EMA snapshot now
        future = task.remote(ref, self.cfg.eval.n, EVAL_SEED, self.cfg.eval.steps, self.inception, device, threads)
        self.pending[future] = (step, checkpoint_uri)

    def poll(self, timeout: float = 0.0) -> list[EvalRecord]:
        import ray                                                            # RAY
        if not self.pending:
            return []
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        return [r for r in (self._collect(ref) for ref in ready) if r is not None]

    def drain(self) -> list[EvalRecord]:
        done = self.poll(timeout=self.timeout_s)
        for ref, (step, _) in list(self.pending.items()):
            self._failed(step, f"timed out after {self.timeout_s:.0f}s")
            del self.pending[ref]
        return done

    def _collect(self, ref) -> Optional[EvalRecord]:
        import ray                                                            # RAY
        step, uri = self.pending.pop(ref)
        try:
            record = EvalRecord(**ray.get(ref))
        except Exception as err:  # noqa: BLE001 - an evaluation failure must not stop training
            self._failed(step, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
            return None
        record.checkpoint, record.source = uri, "training"
        log_record(self.client, self.run_id, record, self.storage, (self.run_name,))
        return record

    def _failed(self, step: int, why: str) -> None:
        print(f"denoiselab: evaluation of step {step} failed: {why}", file=sys.stderr)
        self.client.set_tag(self.run_id, f"eval.error.{checkpoint_dir_name(step)}", why[:5000])
