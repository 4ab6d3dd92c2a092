"""``train(config, runtime, reporter, batches, resume=None)``: the training loop.

AdamW (+ plug-in parameter groups), optional gradient clipping, EMA, autocast on CUDA, exact
resume from a checkpoint state, per-interval metrics, NaN/inf guard, periodic sample grids.
Runs in one process; distribution comes from the Runtime and the Reporter it is given.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from trainers.build import build_context, build_diffusion, build_network, resolve_run_intervals
from trainers.checkpoint import check_compatible
from trainers.config import RunConfig
from trainers.data import BatchSource
from trainers.diffusion import sample
from trainers.ema import EMA
from trainers.errors import CheckpointError, ConfigError, TrainingDiverged
from trainers.images import make_grid, png_bytes
from trainers.methods import Intervals, compose
from trainers.reporting import Reporter
from trainers.runtime import Runtime
from trainers.step import TrainState, train_step

__all__ = ["train", "build_state", "make_state", "sample_grid"]


def build_state(cfg: RunConfig, runtime: Runtime, batches: BatchSource, *, resume: Optional[dict] = None,
                init: Optional[dict] = None, intervals: Optional[Intervals] = None) -> TrainState:
    """Everything the step needs, restored from ``resume`` (same run) or ``init`` (weights only)."""
    if resume is not None:
        intervals = Intervals.from_list(resume["intervals"])
    elif intervals is None:
        intervals, _ = resolve_run_intervals(cfg)
    ctx = build_context(cfg, intervals, runtime.world_size)
    plan = compose(cfg.methods, ctx, runtime.device)
    model, spec = build_network(cfg, image_size=batches.image_size, channels=batches.channels,
                                num_classes=batches.num_classes, plan=plan, ctx=ctx, seed=cfg.train.seed)
    source = resume if resume is not None else init
    if source is not None:
        what = "resume" if resume is not None else f"init_from={cfg.init_from}"
        check_compatible(source, spec, what)
        try:
            model.load_state_dict(source["ema"] if resume is None else source["model"])
        except RuntimeError as err:                 # same spec, different transforms (e.g. DTR on/off)
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"{what}: the checkpoint's weights do not fit this run's model "
                                  f"({first}); use the same methods as the run that wrote it") from None
    model.to(runtime.device)
    ema = EMA(model, cfg.train.ema_decay)
    if resume is not None:
        ema.load_state_dict(resume["ema"])
    wrapped = runtime.wrap_model(torch.compile(model) if cfg.train.compile else model)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.train.lr,
               "weight_decay": cfg.train.weight_decay, "name": "model"}] + plan.weighter.param_groups()
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scaler = _scaler(cfg, runtime, plan)
    state = TrainState(model=wrapped, raw_model=model, ema=ema, optimizer=optimizer, scaler=scaler,
                       diffusion=build_diffusion(cfg), plan=plan, intervals=intervals, runtime=runtime, cfg=cfg,
                       null_class=batches.num_classes if batches.num_classes > 0 else None)
    state.spec = spec
    if resume is not None:
        _load_resume(state, resume)
    return state


def _scaler(cfg: RunConfig, runtime: Runtime, plan):
    if cfg.train.precision != "fp16" or runtime.device.type != "cuda":
        return None
    if plan.combiner.name != "sum":
        raise ConfigError(f"train.precision: fp16 with ANT-{plan.combiner.name} is not supported "
                          f"(per-interval gradients bypass the GradScaler); use bf16 or fp32")
    return torch.amp.GradScaler("cuda")


def _load_resume(state: TrainState, resume: dict) -> None:
    state.optimizer.load_state_dict(resume["optimizer"])
    if state.scaler is not None and resume.get("scaler"):
        state.scaler.load_state_dict(resume["scaler"])
    for name, obj in state.plan.stateful().items():
        obj.load_state_dict(resume["plugins"].get(name, {}))
    state.step = int(resume["step"])


def make_state(state: TrainState) -> dict:
    """The checkpoint: enough to continue bit-for-bit (ARCHITECTURE.md §5.6)."""
    return {"format": 1, "step": state.step, "model": state.raw_model.state_dict(),
            "ema": state.ema.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else {},
            "plugins": {name: obj.state_dict() for name, obj in state.plan.stateful().items()},
            "config": state.cfg.to_dict(), "intervals": state.intervals.to_list(),
            "model_spec": state.spec, "plan": state.plan.describe()}


@torch.no_grad()
def sample_grid(model: torch.nn.Module, diffusion, cfg: RunConfig, *, image_size: int, channels: int,
                num_classes: int, n: int, device, seed: int = 0) -> torch.Tensor:
    """n EMA samples; class-conditional models cycle through the classes."""
    y = torch.arange(n, device=device) % num_classes if num_classes > 0 else None
    gen = torch.Generator().manual_seed(seed)
    return sample(model, diffusion, (n, channels, image_size, image_size), steps=cfg.sample.steps,
                  sampler=cfg.sample.sampler, y=y, null_class=num_classes if num_classes > 0 else None,
                  guidance=cfg.sample.guidance, eta=cfg.sample.eta, generator=gen, device=device)


def _grid_png(state: TrainState, batches: BatchSource) -> bytes:
    images = sample_grid(state.ema.model, state.diffusion, state.cfg, image_size=batches.image_size,
                         channels=batches.channels, num_classes=batches.num_classes,
                         n=state.cfg.sample.n, device=state.runtime.device)
    return png_bytes(make_grid(images, scale=max(1, 64 // batches.image_size)))


def train(cfg: RunConfig, runtime: Runtime, reporter: Reporter, batches: BatchSource, *,
          resume: Optional[dict] = None, init: Optional[dict] = None,
          intervals: Optional[Intervals] = None) -> dict:
    """Train to ``cfg.train.steps``; returns a summary (final step, last metrics, timings)."""
    state = build_state(cfg, runtime, batches, resume=resume, init=init, intervals=intervals)
    tc, metrics, last_ckpt = cfg.train, {}, state.step if resume is not None else 0
    window_start, window_steps, started = time.perf_counter(), 0, time.perf_counter()
    images_per_step = cfg.train.batch_size
    for step in range(state.step, tc.steps):
        x0, y = batches.get(step)
        metrics = train_step(state, x0, y, step)
        window_steps += 1
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(f"train: loss became {metrics['loss']} at step {step + 1}; the last good "
                                   f"checkpoint (step {last_ckpt}) is kept - lower train.lr or set train.grad_clip")
        done = state.step
        if done % tc.log_every == 0 or done == tc.steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics.update(steps_per_s=window_steps / elapsed, images_per_s=window_steps * images_per_step / elapsed)
            metrics.update(state.plan.sampler.metrics())
            metrics.update(state.plan.weighter.metrics())
            metrics.update(state.plan.combiner.metrics())
            reporter.log(done, metrics)
            window_start, window_steps = time.perf_counter(), 0
        if tc.sample_every and done % tc.sample_every == 0 and runtime.is_main:
            reporter.artifact(f"samples/step_{done:08d}.png", _grid_png(state, batches))
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            reporter.checkpoint(done, make_state(state) if runtime.is_main else None, metrics)
            last_ckpt = done
    if runtime.is_main and cfg.sample.n > 0:
        reporter.artifact("samples/final.png", _grid_png(state, batches))
    summary = {"step": state.step, "metrics": metrics, "seconds": time.perf_counter() - started,
               "plan": state.plan.describe(), "intervals": state.intervals.pairs()}
    reporter.close(summary)
    return summary
