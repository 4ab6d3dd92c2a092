"""MEME costs, measured: sampling with an expert set vs the single larger model it replaces, and
training N experts side by side vs one.

Sampling: the set of ``orchestrator/experiments/meme_digits.yaml`` (4 × UNet-N, mixer ratios from
the ramp, hard-routed) vs its baseline (UNet-T), untrained weights (the cost does not depend on
them), the same DDIM steps and batch; the two are interleaved in rounds, the figure is the median
images/s. Training: steps/s of one expert in one process vs N experts in N processes at once (one
thread each); the ratio is the parallel efficiency of training experts side by side on this
machine (Ray's own overhead is measured by ``ray_overhead.py``).

    .venv/bin/python benchmarks/meme.py [--config orchestrator/experiments/meme_digits.yaml] [--n 64]
                                        [--steps 50] [--rounds 3] [--train-steps 30]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, median, print_table  # noqa: E402
from trainers.build import build_all, build_diffusion, resolve_run_intervals  # noqa: E402
from trainers.cost import expert_set_cost  # noqa: E402
from trainers.diffusion import sample  # noqa: E402
from trainers.methods.meme import ExpertRouter, expert_configs  # noqa: E402


def _load(path: str):
    from orchestrator.infra.config_io import load_run_config
    return load_run_config(path)


def _network(cfg, geometry):
    channels, size, classes = geometry
    return build_all(cfg, image_size=size, channels=channels, num_classes=classes)[0].eval()


def _sampling_rate(model, diffusion, args, geometry) -> float:
    channels, size, classes = geometry
    y = torch.arange(args.n) % classes
    t0 = time.perf_counter()
    sample(model, diffusion, (args.n, channels, size, size), steps=args.steps, sampler="ddim", y=y,
           null_class=classes, generator=torch.Generator().manual_seed(0))
    return args.n / (time.perf_counter() - t0)


def _train_rate(data: dict, steps: int, queue) -> None:
    """Child process: steps/s of one expert, one thread."""
    torch.set_num_threads(1)
    from trainers.config import load_config
    from trainers.data import training_batches
    from trainers.loop import build_state
    from trainers.runtime import LocalRuntime
    from trainers.step import train_step
    cfg = load_config(data)
    batches = training_batches(cfg)
    state = build_state(cfg, LocalRuntime(), batches)
    for step in range(3):
        train_step(state, *batches.get(step), step)
    t0 = time.perf_counter()
    for step in range(3, 3 + steps):
        train_step(state, *batches.get(step), step)
    queue.put(steps / (time.perf_counter() - t0))


def _concurrent(configs: list, steps: int) -> list[float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_train_rate, args=(c.to_dict(), steps, queue)) for c in configs]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return rates


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="orchestrator/experiments/meme_digits.yaml")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = _load(args.config)
    from orchestrator.infra.data_io import run_geometry
    geometry = run_geometry(cfg)
    experts = expert_configs(cfg)
    intervals, _ = resolve_run_intervals(experts[0])
    router = ExpertRouter(intervals, [_network(e, geometry) for e in experts])
    baseline_cfg = cfg.replace(model=type(cfg.model)(name=cfg.methods.meme.baseline),
                               methods=type(cfg.methods)({}))
    single = _network(baseline_cfg, geometry)
    diffusion = build_diffusion(cfg)
    rates: dict[str, list[float]] = {"expert set": [], "single": []}
    _sampling_rate(router, diffusion, args, geometry)                       # warm-up
    for _ in range(args.rounds):
        rates["expert set"].append(_sampling_rate(router, diffusion, args, geometry))
        rates["single"].append(_sampling_rate(single, diffusion, args, geometry))
    cost = expert_set_cost(cfg.replace(sample=type(cfg.sample)(steps=args.steps)), channels=geometry[0],
                           image_size=geometry[1], num_classes=geometry[2])
    rows = [{"model": f"{len(experts)} x {experts[0].model.name} (routed)", "images_per_s": median(rates["expert set"]),
             "params_per_step": cost["mean_params_per_step"], "macs_per_image": cost["routed_macs_per_pass"]},
            {"model": f"{cfg.methods.meme.baseline} (single)", "images_per_s": median(rates["single"]),
             "params_per_step": cost["baseline"]["params"], "macs_per_image": cost["baseline"]["macs_per_pass"]}]
    speedup = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    print(f"sampling: {args.n} images, DDIM {args.steps} steps, {args.rounds} rounds, {args.threads} threads")
    print_table(rows, ["model", "images_per_s", "params_per_step", "macs_per_image"])
    alone = _concurrent(experts[:1], args.train_steps)[0]
    together = _concurrent(experts, args.train_steps)
    ideal = min(len(experts), mp.cpu_count())
    aggregate = sum(together) / alone
    efficiency = aggregate / ideal
    print(f"training: one expert alone {alone:.2f} steps/s; {len(experts)} side by side "
          f"{', '.join(f'{r:.2f}' for r in together)} steps/s: {aggregate:.2f}x one expert's throughput "
          f"(ideal {ideal}x on {mp.cpu_count()} cores; efficiency {efficiency:.2f})")
    emit({"benchmark": "meme", "sampling_speedup": round(speedup, 3), "sampling_images_per_s":
          {r["model"]: round(r["images_per_s"], 2) for r in rows}, "params_ratio": round(cost["baseline"]["params_ratio"], 3),
          "macs_ratio": round(cost["baseline"]["macs_ratio"], 3), "train_alone_steps_per_s": round(alone, 3),
          "train_concurrent_steps_per_s": [round(r, 3) for r in together], "aggregate_vs_one": round(aggregate, 3),
          "parallel_efficiency": round(efficiency, 3)})


if __name__ == "__main__":
    main()
