"""The training driver: config -> checks -> Ray Train ``TorchTrainer`` -> summary.

Checks that can fail fast (storage, tracking server, config) run before Ray starts any worker.
The run name is deterministic (``run_name_for``), so re-running the same command with the same
storage resumes from the latest checkpoint (Ray Train V2 reads
``NAME/checkpoint_manager_snapshot.json``) and appends to the same MLflow run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from orchestrator.infra.checkpoints import base_reference, latest_step, resolve_checkpoint
from orchestrator.infra.config_io import dump_yaml
from orchestrator.infra.data_io import check_kind, read_metadata, run_geometry
from orchestrator.infra.latents import load_decoder
from orchestrator.infra.session import durable_path
from orchestrator.infra.session import connect_ray
from orchestrator.infra.storage import Storage, StorageError, open_storage
from orchestrator.infra.patient_fs import patient
from orchestrator.infra.retry import Backoff, first_line, retry_call
from orchestrator.runs.reporter import TIMINGS
from orchestrator.infra.tracking import (STORAGE_TAG, MetricSpool, check_tracking, ensure_experiment,
                                         find_or_create_run, log_params, quick_http_failures, replay_spool,
                                         resolve_tracking_uri)
from trainers.build import build_context, load_affinity, resolve_run_intervals
from trainers.config import RunConfig, load_config, run_name_for
from trainers.configlib import flatten
from trainers.checkpoint import check_compatible, state_from_bytes
from trainers.errors import CheckpointError, ConfigError, UserError
from trainers.models import model_spec, spec_to_dict
from trainers.weights import check_frozen_base
from trainers.methods import Intervals, compose

__all__ = ["TrainRequest", "TrainOutcome", "run_training", "prepare_run"]

SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class TrainRequest:
    config: RunConfig
    address: Optional[str] = None      # None = local Ray; "auto", "ray://host:10001", "host:6379"
    restart: bool = False              # new run (new name) from the same config
    register: Optional[str] = None     # register the final checkpoint as this MLflow model
    parent_run_id: Optional[str] = None
    quiet: bool = False
    train_callbacks: tuple = ()        # ray.train.UserCallback objects, e.g. Tune's TuneReportCallback()


@dataclass
class TrainOutcome:
    run_name: str
    run_id: str
    tracking_uri: str
    checkpoint_uri: Optional[str]
    resumed: bool
    storage_uri: str
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)   # seconds per phase (phase_timings)


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Workers run in another directory (and maybe on another node): no relative paths."""
    def absolute(path: Optional[str]) -> Optional[str]:
        if not path or "://" in path:
            return path
        return os.path.abspath(os.path.expanduser(path))
    storage = cfg.storage.path if "://" in cfg.storage.path else durable_path(cfg.storage.path, "storage.path")
    cfg = replace(cfg, storage=replace(cfg.storage, path=storage),
                  data=replace(cfg.data, path=absolute(cfg.data.path), encoder=absolute(cfg.data.encoder)),
                  intervals=replace(cfg.intervals, artifact=absolute(cfg.intervals.artifact)))
    if cfg.init_from and ("/" in cfg.init_from or cfg.init_from.startswith(".")):
        cfg = replace(cfg, init_from=absolute(cfg.init_from))
    return cfg


def _restart_name(storage: Storage, base: str) -> str:
    i = 2
    while storage.exists(f"{base}-r{i}"):
        i += 1
    return f"{base}-r{i}"


@dataclass
class PreparedRun:
    cfg: RunConfig
    name: str
    storage: Storage
    tracking_uri: str
    payload: dict
    plan: dict
    experiment_id: str = ""


def prepare_run(req: TrainRequest) -> PreparedRun:
    """Everything that can fail before a worker starts: storage, tracking, intervals, data."""
    cfg = _absolute_paths(req.config)
    probe = open_storage(cfg.storage.path, cfg.storage.endpoint, cfg.storage.region, fail_fast=True)
    probe.check()
    storage = open_storage(cfg.storage.path, cfg.storage.endpoint, cfg.storage.region)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, cfg.tracking.experiment)  # refused credentials: one line, before Ray
    name = run_name_for(cfg)
    if req.restart:
        name = _restart_name(storage, name)
        cfg = replace(cfg, name=name)
    tas = None
    if cfg.intervals.rule == "affinity":
        tas = _affinity_matrix(cfg, storage)
    intervals, _ = resolve_run_intervals(cfg, tas=tas)
    plan = compose(cfg.methods, build_context(cfg, intervals, cfg.scaling.num_workers))   # validates early
    payload: dict[str, Any] = {"config": cfg.to_dict(), "run_name": name, "tracking_uri": tracking_uri,
                               "intervals": intervals.to_list(), "threads": max(1, int(cfg.scaling.cpus_per_worker))}
    if cfg.data.stored:
        data_storage = open_storage(cfg.data.path, cfg.storage.endpoint, cfg.storage.region, fail_fast=True)
        payload["data_meta"] = read_metadata(data_storage)
        check_kind(cfg, payload["data_meta"])
        if cfg.data.name == "latents":
            payload["decoder"] = load_decoder(payload["data_meta"], cfg.data.encoder)   # hash-checked
    if cfg.eval.n > 0:
        from orchestrator.jobs.evaluation import check_eval_config
        payload["evaluate"] = check_eval_config(cfg, payload.get("data_meta"))
    if cfg.init_from:
        ref = resolve_checkpoint(cfg.init_from, storage, cfg.storage.endpoint, cfg.storage.region)
        payload["init_from"] = ref.payload()
        if plan.freeze_backbone:
            payload["base_ref"] = _check_base(cfg, ref, payload.get("data_meta"))
    elif plan.freeze_backbone:
        raise ConfigError(f"init_from: methods {'+'.join(plan.key)} patch a frozen, pretrained model; "
                          f"set init_from=RUN_OR_CHECKPOINT (a run name, checkpoint directory or state.pt)")
    return PreparedRun(cfg, name, storage, tracking_uri, payload, plan.describe(), experiment_id)


def _check_base(cfg: RunConfig, ref, data_meta: Optional[dict]) -> dict:
    """The base a frozen-backbone run patches: not itself a patch, the same diffusion, model,
    transforms and data geometry; returns its reference (URI + SHA-256) for the checkpoints."""
    data = ref.storage.read_bytes(*ref.parts)
    base = state_from_bytes(data, ref.uri)
    if base.get("base"):
        raise CheckpointError(f"init_from: {ref.uri} is itself a patch (of {base['base'].get('uri')}); patch "
                              f"that base, or fine-tune this run with methods.dmp.mode=fine_tuning")
    check_frozen_base(base["config"], cfg, ref.uri)
    channels, size, classes = run_geometry(cfg, data_meta)
    spec = model_spec(cfg.model, image_size=size, channels=channels, num_classes=classes,
                      learn_sigma=cfg.diffusion.learn_sigma)
    check_compatible(base, spec_to_dict(spec), f"init_from={ref.uri}")
    return base_reference(ref, data)


def _affinity_matrix(cfg: RunConfig, storage: Storage):
    art = cfg.intervals.artifact
    if art.startswith("s3://"):
        import tempfile
        src = open_storage(art.rsplit("/", 1)[0], cfg.storage.endpoint, cfg.storage.region)
        with tempfile.NamedTemporaryFile(suffix=".npz") as tmp:
            tmp.write(src.read_bytes(art.rsplit("/", 1)[1]))
            tmp.flush()
            return load_affinity(tmp.name)
    return load_affinity(art)


def _read_parquet(cfg: RunConfig):
    """The stored training set as a Ray Dataset. Only once Ray is connected: ``read_parquet``
    would otherwise start a Ray instance of its own, without the run's address, worker
    environment or dashboard."""
    import ray.data
    data_context = ray.data.DataContext.get_current()
    if not os.environ.get("DENOISELAB_VERBOSE"):                        # one progress line: the trainer's
        data_context.enable_progress_bars = False
        data_context.print_on_execution_start = False
    data_storage = open_storage(cfg.data.path, cfg.storage.endpoint, cfg.storage.region)
    return ray.data.read_parquet(data_storage.root, filesystem=data_storage.fs, file_extensions=["parquet"])


def _check_gpus(cfg: RunConfig, address: Optional[str]) -> None:
    """``scaling.use_gpu`` on a cluster without GPUs: a local instance never gets one (refused);
    a remote cluster may scale GPU nodes up from zero (said, then Ray waits for them)."""
    import ray
    if not cfg.scaling.use_gpu or ray.cluster_resources().get("GPU", 0) >= 1:
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError("scaling.use_gpu: this machine has no GPU that Ray can see; set scaling.use_gpu=false, "
                          "or run on a GPU cluster with --address")
    print("denoiselab: the cluster has no GPU yet; Ray Train waits until the autoscaler adds GPU nodes "
          "(Ctrl-C to stop)", file=sys.stderr)


def _check_data_cpus(cfg: RunConfig) -> None:
    """Ray Data's read tasks need a CPU that no training worker holds; when the workers take every
    CPU of the cluster they would never run and training would wait forever."""
    import ray
    total = ray.cluster_resources().get("CPU", 0)
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if cfg.data.stored and needed <= total < needed + 1:
        raise ConfigError(f"scaling.cpus_per_worker: {cfg.scaling.num_workers} worker(s) x {cfg.scaling.cpus_per_worker:g} "
                          f"CPU take all {total:g} CPUs of the cluster, and Ray Data needs one to stream "
                          f"data.path; lower scaling.cpus_per_worker (or add a node)")


def _check_cluster(storage: Storage) -> int:
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage.is_remote:
        raise StorageError(f"storage.path: {storage.uri} is a local directory but the cluster has {len(nodes)} "
                           f"nodes; multi-node runs need shared object storage: set storage.path=s3://bucket/prefix")
    return len(nodes)


def _start_tracking(prep: PreparedRun, req: TrainRequest, num_nodes: int, fresh: bool) -> tuple[str, bool]:
    cfg = prep.cfg
    exp = prep.experiment_id or ensure_experiment(prep.tracking_uri, cfg.tracking.experiment)
    tags = {STORAGE_TAG: prep.storage.uri_of(prep.name), "denoiselab.cluster_nodes": str(num_nodes),
            "denoiselab.workers": str(cfg.scaling.num_workers)}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id, resumed = find_or_create_run(prep.tracking_uri, exp, prep.name, tags, req.parent_run_id, fresh=fresh)
    _replay(prep, "from an earlier outage")
    params = flatten(cfg.to_dict())
    params.update({f"plan.{k}": v for k, v in prep.plan.items()})
    params.update({f"cost.{k}": v for k, v in _cost(cfg, prep.payload.get("data_meta")).items()})
    params["intervals.resolved"] = str(Intervals.from_list(prep.payload["intervals"]).pairs())
    log_params(prep.tracking_uri, run_id, params)
    return run_id, resumed


def _replay(prep: PreparedRun, what: str) -> None:
    """Metric points spooled to the run's storage while the tracking server was away."""
    spool = MetricSpool(prep.storage, prep.name)
    if spool.files():
        sent = replay_spool(spool, prep.tracking_uri)
        print(f"denoiselab: {sent} spooled metric points {what} replayed into the run", file=sys.stderr)


def _cost(cfg: RunConfig, data_meta: Optional[dict]) -> dict:
    """The model's cost as logged with every run (``denoiselab cost`` prints the same figures)."""
    from trainers.cost import run_cost
    channels, size, classes = run_geometry(cfg, data_meta)
    cost = run_cost(cfg, channels=channels, image_size=size, num_classes=classes)
    return {"params": cost.params, "trainable_params": cost.trainable_params, "added_params": cost.added_params,
            "macs": cost.macs, "flops": cost.flops, "input": "x".join(map(str, cost.input))}


def _trainer(prep: PreparedRun, callbacks: tuple = ()):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig   # RAY
    from ray.train.torch import TorchTrainer                                         # RAY
    from orchestrator.runs.worker import train_loop_per_worker
    sc = prep.cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
    if sc.use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=prep.payload,
        datasets={"train": _read_parquet(prep.cfg)} if prep.cfg.data.stored else None,
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources,
                                     placement_strategy=sc.placement_strategy),
        run_config=RunConfig(name=prep.name, storage_path=prep.storage.root,
                             storage_filesystem=(patient(prep.storage.fs, prep.cfg.storage.retry_seconds)
                                                 if prep.storage.is_remote else None),
                             failure_config=FailureConfig(max_failures=sc.max_failures),
                             callbacks=list(callbacks) or None,
                             # which run a worker process belongs to, for `ps e` and fault tests
                             worker_runtime_env={"env_vars": {"DENOISELAB_RUN": prep.name}},
                             checkpoint_config=CheckpointConfig(num_to_keep=prep.cfg.train.keep_checkpoints),
                             logging_config=train_logging()))


def train_logging():
    """Ray Train's own INFO lines (report dumps, worker-group events) stay in Ray's log files
    (``logs/train/`` of the session) unless ``--verbose``; warnings still reach the console."""
    from ray.train.v2.api.config import LoggingConfig                      # RAY
    return LoggingConfig(log_level="INFO" if os.environ.get("DENOISELAB_VERBOSE") else "WARNING")


def _user_error_in(err: BaseException) -> Optional[UserError]:
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack.extend([e.__cause__, e.__context__])
        for attr in ("worker_failures", "errors"):
            value = getattr(e, attr, None)
            if isinstance(value, dict):
                stack.extend(v for v in value.values() if isinstance(v, BaseException))
    return None


def _storage_outage_in(err: BaseException, prep: PreparedRun) -> Optional[UserError]:
    """Ray Train's controller gave up writing its state to storage (an outage longer than
    ``storage.retry_seconds``): one line instead of Ray's report."""
    text = str(err)
    if "AWS Error" not in text and "S3 error" not in text:
        return None
    detail = next(line.strip() for line in text.splitlines() if "AWS Error" in line or "S3 error" in line)
    return StorageError(f"storage.path: {prep.storage.uri} stayed unreachable for longer than storage.retry_seconds="
                        f"{prep.cfg.storage.retry_seconds:g} ({first_line(RuntimeError(detail))}); the run stops here - "
                        f"re-run the same command to resume from its last stored checkpoint")


def run_training(req: TrainRequest) -> TrainOutcome:
    quick_http_failures()                            # MLflow calls fail in seconds; retries are ours
    clock = {"start": time.time()}
    prep = prepare_run(req)
    resumed_storage = prep.storage.exists(prep.name, SNAPSHOT) or latest_step(prep.storage, prep.name) is not None
    clock["ray_start"] = time.time()
    connect_ray(req.address)
    clock["ray_end"] = time.time()
    num_nodes = _check_cluster(prep.storage)
    _check_data_cpus(prep.cfg)
    _check_gpus(prep.cfg, req.address)
    run_id, resumed = _start_tracking(prep, req, num_nodes, fresh=not resumed_storage)
    prep.payload["run_id"] = run_id
    prep.storage.write_bytes(dump_yaml(prep.cfg).encode(), prep.name, "denoiselab", "config.yaml")
    if not req.quiet:
        verb = "resuming" if resumed_storage else "starting"
        print(f"denoiselab: {verb} run {prep.name} ({prep.cfg.scaling.num_workers} worker(s), "
              f"{num_nodes} node(s)); checkpoints in {prep.storage.uri_of(prep.name)}{_ray_logs()}", file=sys.stderr)
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    client = MlflowClient(prep.tracking_uri)
    try:
        clock["fit_start"] = time.time()
        result = _trainer(prep, req.train_callbacks).fit()
    except (KeyboardInterrupt, SystemExit) as err:
        # Ray Train installs its own SIGINT handler during fit(): it aborts the run and exits the
        # process (code 1, no message). Either way the run was interrupted: mark it and say so.
        _bookkeeping(lambda: client.set_terminated(run_id, "KILLED"), prep.cfg, "marking the run KILLED")
        if isinstance(err, SystemExit) and err.code not in (0, 1, None):
            raise
        raise KeyboardInterrupt from None
    except Exception as err:  # noqa: BLE001 - report the user's mistake in one line when there is one
        _bookkeeping(lambda: client.set_terminated(run_id, "FAILED"), prep.cfg, "marking the run FAILED")
        user = _user_error_in(err) or _storage_outage_in(err, prep)
        if user is not None:
            raise user from None
        raise
    checkpoint_uri = None
    if result.checkpoint is not None:
        checkpoint_uri = prep.storage.uri_of(prep.name, os.path.basename(result.checkpoint.path.rstrip("/")))
    metrics = dict(result.metrics or {})

    def finish() -> None:
        if checkpoint_uri:
            client.set_tag(run_id, "checkpoint.final", checkpoint_uri)
        if req.register and checkpoint_uri:
            register_checkpoint(client, req.register, run_id, checkpoint_uri, dump_yaml(prep.cfg))
        log_stage_plot(client, run_id, prep.storage, prep.name)       # runs with a pacer only
        _replay(prep, "held by the workers during an outage")
        client.set_terminated(run_id, "FINISHED")
        from orchestrator.jobs.evaluation import final_eval_metrics
        metrics.update(final_eval_metrics(client, run_id))
    _bookkeeping(finish, prep.cfg, "recording the end of the run")
    timings = phase_timings(clock, _worker_stamps(prep), time.time())
    if timings:
        _bookkeeping(lambda: client.log_batch(run_id, metrics=[
            Metric(f"time/{k}", v, int(time.time() * 1000), prep.cfg.train.steps) for k, v in timings.items()]),
            prep.cfg, "logging the phase timings")
    return TrainOutcome(prep.name, run_id, prep.tracking_uri, checkpoint_uri, resumed_storage,
                        prep.storage.uri_of(prep.name), metrics, timings)


def _worker_stamps(prep) -> dict:
    import json
    try:
        return json.loads(prep.storage.read_bytes(prep.name, *TIMINGS))
    except (OSError, ValueError):
        return {}


def phase_timings(clock: dict, stamps: dict, end: float) -> dict[str, float]:
    """Seconds per phase of a run: starting Ray, starting the Train worker group, the worker's
    setup (data, resume, model), the training loop, waiting for the final evaluation, and the
    whole command. Empty when the worker left no stamps (e.g. an older worker)."""
    need = ("worker_start", "train_end", "train_s", "eval_end")
    if not all(k in stamps for k in need) or "fit_start" not in clock:
        return {}
    loop_start = stamps["train_end"] - stamps["train_s"]
    return {"ray_s": clock["ray_end"] - clock["ray_start"], "workers_s": stamps["worker_start"] - clock["fit_start"],
            "setup_s": loop_start - stamps["worker_start"], "train_s": stamps["train_s"],
            "eval_s": stamps["eval_end"] - stamps["train_end"], "total_s": end - clock["start"]}


def _bookkeeping(fn, cfg: RunConfig, what: str) -> None:
    """MLflow calls after training: retried through a tracking outage for up to
    ``tracking.retry_seconds``, then a warning - the checkpoints are in storage either way."""
    from mlflow.exceptions import MlflowException
    try:
        retry_call(fn, Backoff(budget=cfg.tracking.retry_seconds), f"{what} in MLflow",
                   transient=(OSError, MlflowException))
    except (OSError, MlflowException) as err:
        print(f"denoiselab: {what} in MLflow failed ({first_line(err)}); the run's checkpoints are in storage, "
              f"re-run the command later to record it", file=sys.stderr)


def _ray_logs() -> str:
    """Where Ray's own log lines went (they stay off the console unless --verbose)."""
    try:
        import ray
        session = ray._private.worker._global_node.get_session_dir_path()      # RAY: no public accessor
    except Exception:  # noqa: BLE001 - a hint only
        return ""
    return f"; Ray's own logs in {session}/logs"


def log_stage_plot(client, run_id: str, storage: Storage, run_name: str) -> None:
    """The curriculum's stage over steps, as ``plots/curriculum_stage.png`` (MLflow + storage)."""
    import tempfile
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    history = sorted(client.get_metric_history(run_id, "curriculum/stage"), key=lambda m: m.step)
    if not history:
        return
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.step([m.step for m in history], [m.value for m in history], where="post")
    ax.set_xlabel("step")
    ax.set_ylabel("curriculum stage (active clusters)")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "curriculum_stage.png")
        fig.savefig(path)
        client.log_artifact(run_id, path, artifact_path="plots")
        with open(path, "rb") as fh:
            storage.write_bytes(fh.read(), run_name, "denoiselab", "artifacts", "plots", "curriculum_stage.png")
    plt.close(fig)


def register_checkpoint(client, model_name: str, run_id: str, checkpoint_uri: str, config_yaml: str) -> str:
    """Register a checkpoint as a model version: the source is a small run artifact holding the
    checkpoint URI and the config; the URI is also a version tag."""
    import tempfile
    from mlflow.exceptions import MlflowException
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "checkpoint_uri.txt"), "w") as fh:
            fh.write(checkpoint_uri + "\n")
        with open(os.path.join(tmp, "config.yaml"), "w") as fh:
            fh.write(config_yaml)
        client.log_artifacts(run_id, tmp, artifact_path="registered_checkpoint")
    try:
        client.create_registered_model(model_name)
    except MlflowException:
        pass
    source = f"{client.get_run(run_id).info.artifact_uri}/registered_checkpoint"
    version = client.create_model_version(model_name, source, run_id=run_id,
                                          tags={"checkpoint_uri": checkpoint_uri})
    return version.version


def config_for_resume(name: str, cfg: RunConfig) -> RunConfig:
    """``--resume NAME``: the stored config of that run (in the same storage)."""
    storage = open_storage(cfg.storage.path, cfg.storage.endpoint, cfg.storage.region)
    if not storage.exists(name, "denoiselab", "config.yaml"):
        raise ConfigError(f"--resume {name}: no run of that name in {storage.uri}; "
                          f"list runs with `denoiselab review`")
    import yaml
    data = yaml.safe_load(storage.read_bytes(name, "denoiselab", "config.yaml"))
    data["storage"], data["tracking"] = cfg.to_dict()["storage"], cfg.to_dict()["tracking"]
    return load_config(data)
