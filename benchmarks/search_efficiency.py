"""Search efficiency: the training compute ASHA + TPE spends to find a configuration within 2 % of
the best that the full grid finds, as a fraction of the grid's compute.

1. The full grid runs for real: ``denoiselab search`` machinery (Ray Train per trial, grid
   sampler, no early stopping), every configuration to the full budget; its per-report curves
   (the metric at every checkpoint) are kept in ``<out>/grid.json`` (``--reuse`` skips step 1).
2. ASHA + TPE is then replayed on those curves with the real searcher and scheduler
   (``search.tuner.make_searcher`` / ``make_scheduler``, Ray Tune, 2 trials at a time): a
   replayed trial reports the recorded metric at each checkpoint, so the search pays exactly the
   steps it would have trained. Compute = training steps; the hit is the first full-budget trial
   (in order of completion) whose final metric is within 2 % (and 5 %) of the grid's best.
   Several seeds; the table shows each, the JSON line the hit rate and the median fraction.

    .venv/bin/python benchmarks/search_efficiency.py [--out runs/bench-search] [--seeds 5] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, median, print_table  # noqa: E402

LRS = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
TOLERANCES = (0.02, 0.05)          # the issue asks for 2 %; 5 % shows how sharp that edge is
SPACE = {"optim": {"lr": {"choices": LRS}},
         "ant": {"count": 4, "rule": "uniform", "mtl": ["uw", "pcgrad"], "uw_lr": 0.025}}


def study_dict(out: Path, name: str, **fields) -> dict:
    base = {"model": {"name": "DiT-N/2"}, "diffusion": {"steps": 100}, "data": {"name": "digits"},
            "train": {"steps": 100, "batch_size": 64, "lr": 1e-3, "log_every": 20, "checkpoint_every": 20,
                      "keep_checkpoints": 1},
            "sample": {"n": 0}, "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "storage": {"path": str(out / "runs")},
            "tracking": {"uri": f"sqlite:///{out}/mlflow.db", "experiment": "bench-search"}}
    return {"name": name, "base": base, "output": str(out / name), "space": SPACE, "metric": "loss",
            "mode": "min", "concurrency": 2, **fields}


def key_of(overrides: dict) -> str:
    return json.dumps(overrides, sort_keys=True)


def run_grid(out: Path) -> dict:
    """The full grid, trained for real; returns {config key: [(step, metric), ...]} and its cost."""
    from ray.tune import ExperimentAnalysis
    from search.command import SearchRequest, run_search
    from search.config import study_from_dict
    size = len(LRS) * 2
    study = study_from_dict(study_dict(out, "grid", budget={"trials": size}, scheduler="none",
                                       sampler={"kind": "grid"}))
    started = time.monotonic()
    outcome = run_search(SearchRequest(study, quiet=True))
    seconds = time.monotonic() - started
    analysis = ExperimentAnalysis(str(out / "runs" / "tune" / "grid"))
    curves = {}
    for trial in analysis.trials:
        df = analysis.trial_dataframes[trial.trial_id].dropna(subset=["loss"]).drop_duplicates("step")
        curves[key_of(trial.config["overrides"])] = [(int(s), float(v)) for s, v in zip(df["step"], df["loss"])]
    grid = {"curves": curves, "seconds": seconds, "steps": sum(c[-1][0] for c in curves.values()),
            "finished": sum(r.status == "finished" for r in outcome.records)}
    (out / "grid.json").write_text(json.dumps(grid))
    return grid


def replay_trial(config: dict, curves: dict) -> None:
    """A trial that 'trains' by reporting the recorded metric at each checkpoint."""
    import ray.tune
    for step, value in curves[key_of(config["overrides"])]:
        time.sleep(0.05)
        ray.tune.report({"loss": value, "step": step})


def replay(out: Path, curves: dict, seed: int, trials: int) -> dict:
    """ASHA + TPE over the recorded curves; returns the compute to the first hit and in all."""
    from ray import tune
    from search.config import study_from_dict
    from search.tuner import make_scheduler, make_searcher, prepare_study
    name = f"replay-{seed}"
    shutil.rmtree(out / name, ignore_errors=True)          # a fresh Optuna study (sqlite in <out>/<name>)
    study = study_from_dict(study_dict(out, name, seed=seed, budget={"trials": trials},
                                       scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
                                       sampler={"kind": "tpe", "startup_trials": 3}))
    prep = prepare_study(study, samples=8)
    best = min(c[-1][1] for c in curves.values())
    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(tune.with_parameters(replay_trial, curves=curves),
                           tune_config=tune.TuneConfig(search_alg=make_searcher(prep),
                                                       scheduler=make_scheduler(prep), num_samples=trials,
                                                       max_concurrent_trials=2),
                           run_config=tune.RunConfig(name=name, storage_path=tmp, verbose=0))
        results = tuner.fit()
        ended = sorted((r.metrics["timestamp"], r.metrics["step"], r.metrics["loss"]) for r in results)
    spent, hits = 0, {tol: None for tol in TOLERANCES}
    for _, step, value in ended:
        spent += step
        for tol in TOLERANCES:
            if hits[tol] is None and step >= prep.budget_steps and value <= best * (1 + tol):
                hits[tol] = spent
    row = {"seed": seed, "steps_total": spent, "stopped": sum(step < prep.budget_steps for _, step, _ in ended)}
    row.update({f"to_{round(tol * 100)}pct": hits[tol] for tol in TOLERANCES})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=6, help="ASHA+TPE trials per seed (grid: 10)")
    parser.add_argument("--reuse", action="store_true", help="reuse <out>/grid.json instead of training the grid")
    args = parser.parse_args()
    import ray
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from orchestrator.infra.session import connect_ray
    connect_ray(None)
    grid = json.loads((out / "grid.json").read_text()) if args.reuse else run_grid(out)
    rows = []
    for seed in range(args.seeds):
        row = replay(out, grid["curves"], seed, args.trials)
        for tol in TOLERANCES:
            hit = row[f"to_{round(tol * 100)}pct"]
            row[f"fraction_{round(tol * 100)}pct"] = hit / grid["steps"] if hit else None
        rows.append(row)
    ray.shutdown()
    best = min(c[-1][1] for c in grid["curves"].values())
    print(f"grid: {len(grid['curves'])} configs, {grid['steps']} steps, {grid['seconds']:.0f}s wall, best loss "
          f"{best:.4f}; ASHA (grace 1 report, rf 2) + TPE, {args.trials} trials, 2 at a time")
    print_table(rows, ["seed", "steps_total", "stopped", "to_2pct", "fraction_2pct", "to_5pct", "fraction_5pct"])
    result = {"benchmark": "search_efficiency", "grid_configs": len(grid["curves"]), "grid_steps": grid["steps"],
              "grid_seconds": round(grid["seconds"], 1), "grid_best": best, "seeds": args.seeds,
              "trials": args.trials, "total_fraction_median": median(r["steps_total"] / grid["steps"] for r in rows)}
    for tol in TOLERANCES:
        hits = [r[f"fraction_{round(tol * 100)}pct"] for r in rows if r[f"fraction_{round(tol * 100)}pct"]]
        result[f"hit_rate_{round(tol * 100)}pct"] = len(hits) / args.seeds
        result[f"fraction_median_{round(tol * 100)}pct"] = median(hits) if hits else None
    emit(result)


if __name__ == "__main__":
    main()
