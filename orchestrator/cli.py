"""``denoiselab`` command line. Every user mistake ends in one line on stderr and exit code 2;
``--debug`` shows the traceback instead."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from trainers.errors import UserError

__all__ = ["main", "build_parser"]


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.steps=200 (repeatable)")


def _add_eval_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="Ray tasks to split the seeds over (default: 1 per 256 samples, "
                   "at most 8)")
    p.add_argument("--local", action="store_true", help="sample in this process, without Ray")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (default: if the "
                   "cluster has GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--storage", default="./runs", help="where run names are looked up")
    p.add_argument("--endpoint", help="S3-compatible endpoint for s3:// paths")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denoiselab", description="Diffusion training as many denoising tasks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run on Ray Train (or in-process with --local)")
    _add_config_args(p, required=False)
    p.add_argument("--address", help="Ray cluster: auto, ray://host:10001 or host:port (default: start local Ray)")
    p.add_argument("--resume", metavar="RUN", help="resume this run by name, with its stored config")
    p.add_argument("--restart", action="store_true", help="start a new run (new name) from the same config")
    p.add_argument("--register", metavar="MODEL", help="register the final checkpoint as an MLflow model")
    p.add_argument("--local", action="store_true", help="train in this process without Ray or MLflow")

    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="write a Parquet dataset from digits, shapes, an .npz or an image folder")
    d.add_argument("source", help="digits | shapes | path/to/file.npz | path/to/image_folder")
    d.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    d.add_argument("--shard-size", type=int, default=1024)
    d.add_argument("--image-size", type=int, default=16, help="shapes only")
    d.add_argument("--num-classes", type=int, default=4, help="shapes only")
    d.add_argument("--num-samples", type=int, default=4096, help="shapes only")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--endpoint", help="S3-compatible endpoint for --out")

    p = sub.add_parser("sample", help="draw samples from a checkpoint or run (split across Ray workers)")
    p.add_argument("checkpoint", help="run name, checkpoint directory or state.pt")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", default="samples", help="directory or s3:// prefix (samples.npz, parquet/, grid.png, "
                   "samples.json); a path ending in .png writes only the grid")
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=["ddpm", "ddim"])
    p.add_argument("--guidance", type=float)
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    p.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample i depends only on (seed, i)")
    _add_eval_runtime_args(p)

    p = sub.add_parser("evaluate", help="metrics of a run or checkpoint (FD in a feature space; FID with "
                       "--inception), logged to the run's MLflow record")
    p.add_argument("checkpoint", help="run name, checkpoint directory or state.pt")
    p.add_argument("--n", type=int, default=1000, help="samples to generate (small N biases FD upwards)")
    p.add_argument("--inception", help="Inception-v3 weights file (pt_inception-2015-12-05); adds fid and is "
                   "(default: $DENOISELAB_INCEPTION)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's eval.steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")
    p.add_argument("--tracking-uri", help="MLflow store holding the run (default: the run's tracking.uri)")
    p.add_argument("--json", action="store_true")
    _add_eval_runtime_args(p)

    p = sub.add_parser("review", help="list and compare runs from MLflow")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", help="only this experiment")
    p.add_argument("--parent", help="only the child runs of this parent run (a study)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="write comparison plots of these runs")
    p.add_argument("--out", default="review", help="directory for --compare PNGs")
    p.add_argument("--no-log", action="store_true", help="do not log --compare plots to MLflow")

    p = sub.add_parser("intervals", help="cluster timesteps into intervals (ANT DP)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--rule", choices=["uniform", "timestep", "snr", "log-snr", "affinity"], default="uniform")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--min-width", type=int, default=1)
    p.add_argument("--artifact", help="task-affinity artifact (tas.npz) for --rule affinity")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write a PNG of SNR(t) with the boundaries")

    p = sub.add_parser("affinity", help="ANT task-affinity matrix from checkpoints, as a Ray job")
    p.add_argument("checkpoints", nargs="+", help="run names, checkpoint directories or state.pt files")
    p.add_argument("--out", required=True, help="directory or s3:// prefix for tas.npz")
    p.add_argument("--stride", type=int, default=50, help="timestep grid stride (interpolated to T)")
    p.add_argument("--n", type=int, default=256, help="fixed data subset size")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=4096, help="count-sketch projection size (0 = full gradients)")
    p.add_argument("--count", type=int, default=5, help="intervals for the stored partition")
    p.add_argument("--workers", type=int, default=2, help="Ray tasks the timestep grid is split over")
    p.add_argument("--storage", default="./runs")
    p.add_argument("--endpoint")
    p.add_argument("--address")
    p.add_argument("--tracking-uri", help="also log tas.npz to this MLflow store")

    p = sub.add_parser("search", help="run (or resume) a Ray Tune + Optuna study of training runs")
    p.add_argument("study", help="study YAML, e.g. search/studies/smoke.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="study field (budget.trials=4) or run-config override (train.lr=0.001); repeatable")
    p.add_argument("--address", help="Ray cluster: auto, ray://host:10001 or host:port (default: start local Ray)")
    p.add_argument("--register", metavar="MODEL", help="register the best trial's checkpoint as an MLflow model")
    p.add_argument("--include-stopped", action="store_true",
                   help="let trials stopped early by ASHA compete for the best (default: full-budget trials only)")
    return parser


def _cmd_train(args) -> int:
    from orchestrator.config_io import load_run_config
    cfg = load_run_config(args.config, args.overrides)
    if args.local:
        from orchestrator.local import train_local
        train_local(cfg)
        return 0
    from orchestrator.driver import TrainRequest, config_for_resume, run_training
    if args.resume:
        cfg = config_for_resume(args.resume, cfg.replace(name=args.resume))
    outcome = run_training(TrainRequest(cfg, address=args.address, restart=args.restart, register=args.register))
    _print_summary(outcome)
    return 0


def _print_summary(o) -> None:
    ui = f"mlflow ui --backend-store-uri {o.tracking_uri}" if not o.tracking_uri.startswith("http") else o.tracking_uri
    grid = f"{o.storage_uri}/denoiselab/artifacts/samples/final.png"
    print(f"\nrun         {o.run_name}{' (resumed)' if o.resumed else ''}\n"
          f"mlflow run  {o.run_id}  ->  {ui}\n"
          f"checkpoint  {o.checkpoint_uri}\n"
          f"samples     {grid}")
    for key in ("loss", "fd_digits", "fd_shapes", "fid", "is"):
        if key in o.metrics:
            print(f"{key:<11} {o.metrics[key]:.4f}")


def _cmd_data(args) -> int:
    from orchestrator.data_io import from_image_folder, from_npz, write_dataset
    from orchestrator.storage import open_storage
    from trainers.config import DataConfig
    from trainers.data import builtin_dataset
    if args.source in ("digits", "shapes"):
        data = builtin_dataset(DataConfig(name=args.source, image_size=args.image_size, num_classes=args.num_classes,
                                          num_samples=args.num_samples, seed=args.seed))
    elif args.source.endswith(".npz"):
        data = from_npz(args.source)
    else:
        data = from_image_folder(args.source)
    if args.shard_size < 1:
        raise UserError("--shard-size: must be >= 1")
    storage = open_storage(args.out, args.endpoint, fail_fast=True)
    storage.check()
    meta = write_dataset(data, open_storage(args.out, args.endpoint), shard_size=args.shard_size)
    print(f"wrote {meta['count']} images ({meta['image_size']}x{meta['image_size']}x{meta['channels']}, "
          f"{meta['num_classes']} classes) in {len(meta['shards'])} shard(s) to {storage.uri}")
    return 0


def _cmd_sample(args) -> int:
    from orchestrator.checkpoints import read_checkpoint, resolve_checkpoint
    from orchestrator.sampling import SampleSpec, sample_images, sampling_mode, write_samples
    from orchestrator.storage import open_storage
    ref = resolve_checkpoint(args.checkpoint, open_storage(args.storage, args.endpoint), args.endpoint)
    spec = SampleSpec(n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                      eta=args.eta, use_ema=not args.raw)
    local, workers = sampling_mode(args.n, args.workers, args.local)
    state = read_checkpoint(ref)
    if not local:
        from orchestrator.driver import connect_ray
        connect_ray(args.address)
    result = sample_images(state, spec, workers=workers, local=local, use_gpu=args.gpu,
                           cpus_per_worker=args.cpus_per_worker)
    paths = write_samples(result, args.out, args.endpoint)
    m = result.meta
    print(f"wrote {args.n} samples of {ref.uri} ({m['sampler']}, {m['steps']} steps, guidance {m['guidance']}, "
          f"{m['weights']} weights, seed {m['seed']}; {m['workers']} worker process(es))")
    for what, uri in paths.items():
        print(f"  {what:<8}{uri}")
    return 0


def _cmd_intervals(args) -> int:
    from orchestrator.intervals_cmd import run_intervals
    result = run_intervals(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['rule']} intervals on the {result['schedule']} schedule (T={result['steps']}, "
              f"cost {result['cost']:.4g}):")
        for lo, hi in result["intervals"]:
            print(f"  [{lo}, {hi})")
    return 0


def _cmd_affinity(args) -> int:
    from orchestrator.jobs.affinity import AffinityRequest, run_affinity
    result = run_affinity(AffinityRequest(tuple(args.checkpoints), args.out, stride=args.stride, num_images=args.n,
                                          batch=args.batch, dim=args.dim, count=args.count, workers=args.workers,
                                          storage=args.storage, endpoint=args.endpoint,
                                          tracking_uri=args.tracking_uri), address=args.address)
    print(json.dumps(result))
    return 0


def _cmd_evaluate(args) -> int:
    from orchestrator.evaluation import evaluate_checkpoint
    from orchestrator.sampling import sampling_mode
    local, workers = sampling_mode(args.n, args.workers, args.local)
    record, run_id, run_name = evaluate_checkpoint(
        args.checkpoint, n=args.n, seed=args.seed, steps=args.steps, inception=args.inception, workers=workers,
        local=local, storage=args.storage, endpoint=args.endpoint, tracking_uri=args.tracking_uri,
        address=args.address, use_ema=not args.raw)
    if args.json:
        print(json.dumps({**record.to_dict(), "run_name": run_name, "mlflow_run_id": run_id}))
        return 0
    s = record.sampling
    where = f"mlflow run {run_id} (step {record.step})" if run_id else "no MLflow run of that name: not logged"
    print(f"run         {run_name}  ->  {where}\ncheckpoint  {record.checkpoint}\n"
          f"samples     n={record.n} seed={record.seed} {s['sampler']} {s['steps']} steps guidance {s['guidance']} "
          f"{s['weights']} ({s['workers']} worker(s), {record.seconds:.0f}s)\n"
          f"extractors  {', '.join(record.extractors)}")
    for key, value in sorted(record.metrics.items()):
        print(f"{key:<19} {value:.4f}")
    return 0


def _cmd_review(args) -> int:
    from orchestrator.review import compare_runs, format_table, list_runs, open_store
    client, _ = open_store(args.tracking_uri)
    if args.compare:
        result = compare_runs(client, args.compare, args.out, args.experiment, log=not args.no_log)
        if args.format == "json":
            print(json.dumps(result, default=str))
            return 0
        print(format_table(result["runs"]))
        for name, path in result["plots"].items():
            print(f"  {name:<14}{path}")
        if result["logged_to"]:
            print(f"logged as artifacts review/*.png of {len(result['logged_to'])} run(s)")
        return 0
    rows = list_runs(client, args.experiment, args.parent)
    print(json.dumps(rows, default=str) if args.format == "json" else format_table(rows))
    return 0


def _cmd_search(args) -> int:
    from search.command import SearchRequest, run_search    # search builds on orchestrator: imported lazily
    from search.config import load_study
    run_search(SearchRequest(load_study(args.study, args.overrides), address=args.address, register=args.register,
                             include_stopped=args.include_stopped))
    return 0


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "review": _cmd_review,
            "data": _cmd_data, "sample": _cmd_sample, "intervals": _cmd_intervals,
            "affinity": _cmd_affinity, "search": _cmd_search}


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        if args.debug:
            raise
        print(f"denoiselab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("denoiselab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
