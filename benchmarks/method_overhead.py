"""Per-step time of each method relative to vanilla, on the same config, in one process.

Configs are interleaved in rounds (A B C … A B C …) so drift hits all alike; the figure per config
is the median per-step time over all rounds after warm-up. Anchors (ANT paper Table 3,
throughput): UW ≈ 1.00×, Nash ≈ 0.95×, PCGrad ≈ 0.72×. Targets in time: UW ≤ 1.02×,
Nash ≤ 1.08×, PCGrad ≤ 1.3× (K = 5), DTR ≤ 1.05×, curriculum ≤ 1.01×.

    .venv/bin/python benchmarks/method_overhead.py [--model DiT-T/2] [--rounds 5] [--steps 20] [--device cpu] [--intervals 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, median, print_table  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.data import StepBatches, builtin_dataset, make_shapes  # noqa: E402
from trainers.loop import build_state  # noqa: E402
from trainers.runtime import LocalRuntime  # noqa: E402
from trainers.step import train_step  # noqa: E402

METHODS = {
    "vanilla": {},
    "ant-uw": {"ant": {"mtl": "uw"}},
    "ant-pcgrad": {"ant": {"mtl": "pcgrad"}},
    "ant-pcgrad-recompute": {"ant": {"mtl": "pcgrad", "interval_grads": "recompute"}},   # Gram only, update recomputed
    "ant-pcgrad-kxp": {"ant": {"mtl": "pcgrad"}},        # the [K, P]-matrix path it replaced (dense_kxp)
    "ant-pcgrad-padded": {"ant": {"mtl": "pcgrad"}},     # interval groups always copied (padded_groups)
    "ant-nash": {"ant": {"mtl": "nash", "nash_every": 25}},
    "dtr": {"dtr": {}},
    "curriculum": {"curriculum": {"clusters": 20, "pacing": "adaptive", "patience": 200}},
    "dtr+ant-uw": {"dtr": {}, "ant": {"mtl": "uw"}},
}


def dense_kxp(combiner) -> None:
    """PCGrad/Nash as before 2026-12-03: the [K, P] interval-gradient matrix from the captured
    layer I/O (K index-selects and GEMMs per layer), then the Gram and the weighted sum on it."""
    from trainers.methods.grouped_grads import DenseTaskGradients

    def task_gradients(task_loss, active, params, runtime, task):
        capture, combiner._capture = combiner._capture, None
        return DenseTaskGradients(capture.gradients(task_loss.sum(), task, active), params)
    combiner._task_gradients = task_gradients


def padded_groups(combiner) -> None:
    """PCGrad as before 2026-12-04: each layer's inputs and output gradients gathered into
    zero-padded interval groups (a concatenation and a gather, two copies) even when the stratified
    batch is already laid out interval by interval (now a free view)."""
    from trainers.methods import grouped_grads as gg

    class Padded(gg.IntervalGroups):
        def __init__(self, task, k):
            super().__init__(task, k)
            self.mode, self.index = "padded", gg.padded_index(task, torch.bincount(task, minlength=k), self.m)

    original = combiner._task_gradients

    def task_gradients(*args, **kwargs):
        current, gg.IntervalGroups = gg.IntervalGroups, Padded
        try:
            return original(*args, **kwargs)
        finally:
            gg.IntervalGroups = current
    combiner._task_gradients = task_gradients


def make_state(method: str, model: str, batch: int, image_size: int, device: str, precision: str,
               intervals: int = 5):
    data = {"name": "shapes", "image_size": image_size, "num_samples": 512} if image_size > 8 else {"name": "digits"}
    cfg = load_config({"model": {"name": model}, "data": data, "intervals": {"count": intervals},
                       "methods": METHODS[method], "train": {"batch_size": batch, "precision": precision}})
    dataset = (make_shapes(512, image_size, 4, 0) if image_size > 8 else builtin_dataset(cfg.data))
    batches = StepBatches(dataset, batch)
    state = build_state(cfg, LocalRuntime(device), batches)
    if method.endswith("-kxp"):
        dense_kxp(state.plan.combiner)
    if method.endswith("-padded"):
        padded_groups(state.plan.combiner)
    return state, batches


def timed_steps(state, batches, start: int, steps: int, device: str) -> list[float]:
    times = []
    for step in range(start, start + steps):
        x0, y = batches.get(step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(state, x0, y, step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="DiT-T/2")
    p.add_argument("--batch", type=int, default=60)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--intervals", type=int, default=5, help="K, the number of timestep intervals")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.methods.split(",")
    states = {m: make_state(m, args.model, args.batch, args.image_size, args.device, args.precision,
                             args.intervals) for m in names}
    for m in names:
        timed_steps(*states[m], 0, args.warmup, args.device)
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(args.rounds):
        for m in names:
            times[m] += timed_steps(*states[m], args.warmup + r * args.steps, args.steps, args.device)
    base = median(times["vanilla"])
    rows = [{"method": m, "ms_per_step": 1000 * median(times[m]), "time_vs_vanilla": median(times[m]) / base,
             "images_per_s": args.batch / median(times[m])} for m in names]
    print(f"model {args.model}, batch {args.batch}, {args.image_size}x{args.image_size}, device {args.device}, "
          f"{args.precision}, K={args.intervals} intervals, {args.rounds}x{args.steps} steps per method")
    print_table(rows, ["method", "ms_per_step", "time_vs_vanilla", "images_per_s"])
    emit({"benchmark": "method_overhead", "model": args.model, "device": args.device, "batch": args.batch,
          "intervals": args.intervals, "precision": args.precision,
          "time_vs_vanilla": {r["method"]: round(r["time_vs_vanilla"], 4) for r in rows},
          "ms_per_step": {r["method"]: round(r["ms_per_step"], 3) for r in rows}})


if __name__ == "__main__":
    main()
