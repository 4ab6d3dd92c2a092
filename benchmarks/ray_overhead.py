"""Ray Train overhead: the same tiny config for the same steps in-process vs through Ray Train
with one worker. Prints steady-state steps/s of each (median over logging windows, the first
window dropped), their ratio (target >= 0.97), and startup seconds separately.

The two are interleaved in one process, and the order alternates between repeats (in-process
first on even repeats, Ray first on odd ones) so that a slow drift of the machine does not favour
either. Each repeat's ratio pairs the two runs next to each other; the summary gives the median
ratio, the quartiles of the per-repeat ratios and a bootstrap 90 % interval of the median, so a
gap can be read against the spread.

    .venv/bin/python benchmarks/ray_overhead.py [--steps 300] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import torch  # noqa: E402

from benchmarks.common import emit, median, print_table  # noqa: E402
from trainers.config import load_config  # noqa: E402


def config(steps: int, tmp: str, name: str):
    return load_config({"name": name, "model": {"name": "DiT-T/2"}, "data": {"name": "digits"},
                        "train": {"steps": steps, "batch_size": 64, "log_every": 25, "checkpoint_every": steps},
                        "sample": {"n": 0}, "scaling": {"num_workers": 1, "cpus_per_worker": 2},
                        "storage": {"path": f"{tmp}/runs"},
                        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "bench"}})


def in_process(cfg, tmp: str) -> tuple[float, float]:
    from trainers.data import StepBatches, builtin_dataset
    from trainers.loop import train
    from trainers.reporting import LocalReporter
    from trainers.runtime import LocalRuntime
    torch.set_num_threads(2)
    start = time.perf_counter()
    run_dir = Path(tmp) / "local" / cfg.name
    train(cfg, LocalRuntime(), LocalReporter(run_dir), StepBatches(builtin_dataset(cfg.data), cfg.train.batch_size))
    wall = time.perf_counter() - start
    rates = [json.loads(line)["steps_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return median(rates[1:]), wall


def through_ray(cfg) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient
    from orchestrator.runs.driver import TrainRequest, run_training
    start = time.perf_counter()
    out = run_training(TrainRequest(cfg, quiet=True))
    wall = time.perf_counter() - start
    history = sorted(MlflowClient(out.tracking_uri).get_metric_history(out.run_id, "steps_per_s"), key=lambda m: m.step)
    return median(m.value for m in history[1:]), wall


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def bootstrap_median_interval(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of the median over resamples (with replacement) of the repeats."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.05 * draws)], medians[int(0.95 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import ray
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from orchestrator.infra.session import connect_ray
        t0 = time.perf_counter()
        connect_ray(None)                  # the embedded instance exactly as `denoiselab train` starts it
        ray_init_s = time.perf_counter() - t0
        for r in range(args.repeats):
            if r % 2 == 0:
                local_sps, local_wall = in_process(config(args.steps, tmp, f"local-{r}"), tmp)
                ray_sps, ray_wall = through_ray(config(args.steps, tmp, f"ray-{r}"))
            else:
                ray_sps, ray_wall = through_ray(config(args.steps, tmp, f"ray-{r}"))
                local_sps, local_wall = in_process(config(args.steps, tmp, f"local-{r}"), tmp)
            rows.append({"repeat": r, "in_process_steps_s": local_sps, "ray_steps_s": ray_sps,
                         "ratio": ray_sps / local_sps, "in_process_wall_s": local_wall, "ray_wall_s": ray_wall,
                         "ray_startup_s": ray_wall - args.steps / ray_sps})
        ray.shutdown()
    print_table(rows, list(rows[0]))
    result = {"benchmark": "ray_overhead", "steps": args.steps, "ray_init_s": ray_init_s,
              "in_process_steps_s": median(r["in_process_steps_s"] for r in rows),
              "ray_steps_s": median(r["ray_steps_s"] for r in rows),
              "ratio": median(r["ratio"] for r in rows), "ray_startup_s": median(r["ray_startup_s"] for r in rows)}
    ratios = [r["ratio"] for r in rows]
    result["ratio_quartiles"] = quartiles(ratios)
    result["ratio_median_90ci"] = bootstrap_median_interval(ratios)
    low, high = result["ratio_median_90ci"]
    print(f"\nsteady-state ratio Ray/in-process: median {result['ratio']:.3f} over {len(rows)} repeats "
          f"(quartiles {result['ratio_quartiles'][0]:.3f}-{result['ratio_quartiles'][1]:.3f}, bootstrap 90% "
          f"interval of the median {low:.3f}-{high:.3f}; target >= 0.97); "
          f"ray.init {ray_init_s:.1f}s, Train startup {result['ray_startup_s']:.1f}s")
    emit(result)


if __name__ == "__main__":
    main()
