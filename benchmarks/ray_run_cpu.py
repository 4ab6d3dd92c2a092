"""Where a short Ray Train run's CPU goes, process by process, on an already running local Ray
instance (what every Ray integration test pays): CPU seconds each kind of process used during the
run, read from /proc through psutil before the run and every 0.2 s during it (a process that ends
between two reads loses at most its last 0.2 s).

    .venv/bin/python benchmarks/ray_run_cpu.py [--runs 3] [--steps 2]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from benchmarks.common import emit, median, print_table  # noqa: E402
from orchestrator.infra.session import EMBEDDED_DEFAULTS  # noqa: E402

KINDS = ("TrainController", "DatasetManager", "SynchronizationActor", "PlacementGroupCleaner", "RayTrainWorker",
         "AutoscalingCoordinator", "raylet", "gcs_server", "dashboard", "log_monitor", "ray::IDLE")


def _kind(cmd: str, me: int, pid: int) -> str:
    if pid == me:
        return "driver (this process)"
    return next((k for k in KINDS if k in cmd), "other")


def _snapshot() -> dict[int, tuple[str, float]]:
    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            cpu = p.info["cpu_times"]
            out[p.info["pid"]] = (" ".join(p.info["cmdline"] or []), cpu.user + cpu.system)
        except (psutil.Error, TypeError):
            pass
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    for var, value in EMBEDDED_DEFAULTS.items():
        os.environ.setdefault(var, value)
    import ray

    from orchestrator.runs.driver import TrainRequest, run_training
    from trainers.config import load_config
    ray.init(address="local", num_cpus=4, include_dashboard=True, logging_level="ERROR")
    root = Path(tempfile.mkdtemp(prefix="ray-run-cpu-"))
    per_run, walls = [], []
    for i in range(args.runs):
        cfg = load_config({"name": f"cpu{i}", "model": {"name": "DiT-N/2"}, "diffusion": {"steps": 100},
                           "data": {"name": "digits"}, "intervals": {"count": 4},
                           "train": {"steps": args.steps, "batch_size": 16, "checkpoint_every": args.steps,
                                     "log_every": 1}, "sample": {"n": 0},
                           "storage": {"path": str(root / "runs")}, "tracking": {"uri": f"sqlite:///{root}/m{i}.db"}})
        before, seen, done = _snapshot(), {}, threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.update(_snapshot())
                time.sleep(0.2)
        watcher = threading.Thread(target=watch, daemon=True)
        t0 = time.perf_counter()
        watcher.start()
        run_training(TrainRequest(cfg, quiet=True))
        walls.append(time.perf_counter() - t0)
        time.sleep(1.0)
        done.set()
        watcher.join()
        seen.update(_snapshot())
        cpu: dict[str, float] = collections.Counter()
        for pid, (cmd, seconds) in seen.items():
            cpu[_kind(cmd, os.getpid(), pid)] += seconds - before.get(pid, (cmd, 0.0))[1]
        per_run.append(cpu)
    kinds = sorted({k for c in per_run for k in c}, key=lambda k: -median(c.get(k, 0.0) for c in per_run))
    rows = [{"process": k, "cpu_s_median": median(c.get(k, 0.0) for c in per_run[1:] or per_run),
             "first_run_cpu_s": per_run[0].get(k, 0.0)} for k in kinds]
    print(f"{args.runs} runs of {args.steps} steps; wall s: {', '.join(f'{w:.1f}' for w in walls)} "
          f"(median over runs after the first)")
    print_table(rows, ["process", "cpu_s_median", "first_run_cpu_s"])
    emit({"benchmark": "ray_run_cpu", "wall_s": [round(w, 2) for w in walls],
          "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]})
    ray.shutdown()


if __name__ == "__main__":
    main()
