"""The fast GPU step, each setting on and off in one run: the training loop's own path (batches
prefetched on a side stream, ``device_step``, the divergence watch on the device, metrics read
every ``--log-every`` steps), with ONE setting changed from the defaults per config:

    fast            the CUDA defaults: fused AdamW, foreach EMA, no host sync in the step,
                    prefetched batches, SDPA (flash at bf16), eager model
    adamw-foreach   AdamW's multi-tensor kernels instead of the fused one
    adamw-loop      AdamW one parameter at a time
    ema-loop        the EMA as one lerp per parameter instead of one foreach lerp
    sync-loss       the loss read to the host every step (the NaN guard as it was)
    sync-copies     the step's randomness copied with blocking copies, each waiting for the
                    device (one of the waits the step had before 2026-12-04; the others, CUDA
                    bincount and per-call schedule copies, are not restored here)
    no-prefetch     the batch copied from pageable memory in the step
    sdpa-math       attention through SDPA's math kernel instead of flash
    compile         torch.compile of the model (train.compile)
    cudagraphs      torch.compile(mode="reduce-overhead"): the model's kernels as CUDA graphs

Configs are interleaved in rounds (window of ``--steps`` steps each, synchronised at its ends);
the figure per config is the median per-step time over its windows.

    python3 benchmarks/fast_step.py --device cuda --model DiT-B/2 --batch 240 --precision bf16
    .venv/bin/python benchmarks/fast_step.py --device cpu --model DiT-N/2 --batch 8 --size 8 \\
        --configs fast,adamw-loop,ema-loop,sync-loss --rounds 2 --steps 3     # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import trainers.step as step_module  # noqa: E402
from benchmarks.common import emit, median, print_table  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.data import ArrayDataset, StepBatches  # noqa: E402
from trainers.loop import DivergenceWatch, build_state  # noqa: E402
from trainers.prefetch import on_device  # noqa: E402
from trainers.runtime import LocalRuntime  # noqa: E402

CONFIGS = ("fast", "adamw-foreach", "adamw-loop", "ema-loop", "sync-loss", "sync-copies", "no-prefetch",
           "sdpa-math", "compile", "cudagraphs")


def _blocking_copy(tensor, device):
    return None if tensor is None else tensor.to(device)


def _ema_loop(ema):
    """The EMA update one parameter at a time (what the foreach lerp replaced)."""
    @torch.no_grad()
    def update(model):
        if getattr(ema, "_bound", None) is not model:
            ema._bind(model)
        averaged, followed, buffers = ema._pairs
        for e, p in averaged:
            e.lerp_(p.detach(), 1.0 - ema.decay)
        for e, p in followed:
            e.copy_(p.detach())
        for eb, b in buffers:
            eb.copy_(b)
    return update


class Config:
    """One configuration's state, batch source and per-window step."""

    def __init__(self, name: str, args, data: ArrayDataset):
        self.name, self.args, self.device = name, args, torch.device(args.device)
        adamw = {"adamw-foreach": "foreach", "adamw-loop": "loop"}.get(name, "auto")
        cfg = load_config({"model": {"name": args.model}, "intervals": {"count": 8}, "methods": {},
                           "train": {"batch_size": args.batch, "precision": args.precision, "adamw": adamw,
                                     "compile": name == "compile", "steps": 10 ** 9}})
        self.batches = StepBatches(data, args.batch)
        self.state = build_state(cfg, LocalRuntime(args.device), self.batches)
        if name == "ema-loop":
            self.state.ema.update = _ema_loop(self.state.ema)
        if name == "cudagraphs":
            self.state.model = torch.compile(self.state.raw_model, mode="reduce-overhead")
        self.source = self.batches if name == "no-prefetch" else on_device(self.batches, self.device, 10 ** 9)
        self.watch, self.step = DivergenceWatch(), 0

    def _context(self):
        if self.name == "sdpa-math":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def run(self, steps: int) -> float:
        """Seconds per step over a window of ``steps`` steps."""
        saved = step_module.to_device
        if self.name == "sync-copies":
            step_module.to_device = _blocking_copy
        try:
            _sync(self.device)
            t0 = time.perf_counter()
            with self._context():
                for _ in range(steps):
                    x0, y = self.source.get(self.step)
                    if self.name == "no-prefetch":
                        x0, y = x0.to(self.device), y.to(self.device)
                    out = step_module.device_step(self.state, x0, y, self.step)
                    self.step += 1
                    self.watch.update(out, self.step)
                    if self.name == "sync-loss" or self.step % self.args.log_every == 0:
                        self.watch.check(0)
                        out.resolve()
            _sync(self.device)
            return (time.perf_counter() - t0) / steps
        finally:
            step_module.to_device = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=240)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="steps per window")
    p.add_argument("--warmup", type=int, default=3, help="steps per config before the first window")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        sys.exit(f"--configs: unknown {unknown}; choose from {','.join(CONFIGS)}")
    n = max(args.batch * 4, 64)
    data = ArrayDataset(torch.randn(n, args.channels, args.size, args.size), torch.randint(0, 1000, (n,)), 1000)
    configs, warm_s = [], {}
    for name in names:
        t0 = time.perf_counter()
        config = Config(name, args, data)
        config.run(args.warmup)                          # includes compilation for compile / cudagraphs
        warm_s[name] = time.perf_counter() - t0
        configs.append(config)
        print(f"{name}: built and warmed up in {warm_s[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            times[config.name].append(config.run(args.steps))
    base = median(times[names[0]])
    rows = [{"config": name, "ms_per_step": 1000 * median(times[name]),
             "images_per_s": args.batch / median(times[name]), "time_vs_" + names[0]: median(times[name]) / base,
             "spread_ms": 1000 * (max(times[name]) - min(times[name])), "warmup_s": warm_s[name]} for name in names]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"\n{device}, {args.model}, batch {args.batch}, {args.channels}x{args.size}x{args.size}, {args.precision}, "
          f"{args.rounds} rounds x {args.steps} steps per config, median per-step time over windows")
    print_table(rows, list(rows[0]))
    emit({"benchmark": "fast_step", "device": device, "model": args.model, "batch": args.batch,
          "precision": args.precision,
          "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]})


if __name__ == "__main__":
    main()
