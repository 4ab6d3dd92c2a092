"""``denoiselab sample`` and ``denoiselab evaluate``: samples and metrics of a checkpoint or run."""
from __future__ import annotations

import json

from orchestrator.cli.common import add_eval_runtime_args

__all__ = ["register"]


def register(sub) -> None:
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
    add_eval_runtime_args(p)
    p.set_defaults(handler=_cmd_sample)

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
    add_eval_runtime_args(p)
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_sample(args) -> int:
    from orchestrator.infra.checkpoints import read_checkpoint, resolve_checkpoint
    from orchestrator.jobs.sampling import SampleSpec, sample_images, sampling_mode, write_samples
    from orchestrator.infra.storage import open_storage
    ref = resolve_checkpoint(args.checkpoint, open_storage(args.storage, args.endpoint), args.endpoint)
    spec = SampleSpec(n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                      eta=args.eta, use_ema=not args.raw)
    local, workers = sampling_mode(args.n, args.workers, args.local)
    state = read_checkpoint(ref)
    if not local:
        from orchestrator.infra.session import connect_ray
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


def _cmd_evaluate(args) -> int:
    from orchestrator.jobs.evaluation import evaluate_checkpoint
    from orchestrator.jobs.sampling import sampling_mode
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
