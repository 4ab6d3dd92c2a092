"""``train(config, runtime, reporter, batches, resume=None)``: the training loop.

AdamW (+ plug-in parameter groups), optional gradient clipping, EMA, autocast on CUDA, exact
resume from a checkpoint state, per-interval metrics, NaN/inf guard, periodic sample grids.
Runs in one process; distribution comes from the Runtime and the Reporter it is given.
"""
from __future__ import annotations

import json
import time
import warnings
from typing import Optional

import torch

from trainers.build import build_context, build_diffusion, build_network, resolve_run_intervals
from trainers.checkpoint import FORMAT, check_compatible
from trainers.config import RunConfig
from trainers.data import BatchSource
from trainers.diffusion import sample
from trainers.ema import EMA
from trainers.errors import CheckpointError, ConfigError, TrainingDiverged
from trainers.heldout import heldout_losses
from trainers.images import make_grid, png_bytes
from trainers.methods import Intervals, compose
from trainers.prefetch import on_device
from trainers.reporting import Reporter
from trainers.runtime import Runtime
from trainers.step import TrainState, device_step
from trainers.weights import (adapter_weights, backbone_weights, check_frozen_base, freeze_backbone,
                              load_run_weights)

__all__ = ["train", "build_state", "make_state", "make_optimizer", "sample_grid"]


def build_state(cfg: RunConfig, runtime: Runtime, batches: BatchSource, *, resume: Optional[dict] = None,
                init: Optional[dict] = None, intervals: Optional[Intervals] = None,
                base_ref: Optional[dict] = None) -> TrainState:
    """Everything the step needs. ``init``: a checkpoint whose EMA weights start the backbone (a new
    run from ``init_from``, or the base a frozen-backbone run patches); ``resume``: this run's own
    latest checkpoint; ``base_ref``: what a frozen-backbone checkpoint records about ``init``."""
    if resume is not None:
        intervals = Intervals.from_list(resume["intervals"])
        base_ref = resume.get("base", base_ref)
    elif intervals is None:
        intervals, _ = resolve_run_intervals(cfg)
    ctx = build_context(cfg, intervals, runtime.world_size, runtime.device)
    plan = compose(cfg.methods, ctx)
    base = _base_weights(cfg, plan, resume, init)
    model, spec = build_network(cfg, image_size=batches.image_size, channels=batches.channels,
                                num_classes=batches.num_classes, plan=plan, ctx=ctx, seed=cfg.train.seed,
                                base=base, base_source=f"init_from={cfg.init_from}")
    for source, what in ((init, f"init_from={cfg.init_from}"), (resume, "resume")):
        if source is not None:
            check_compatible(source, spec, what)
    _check_same_plan(resume, plan)
    if plan.freeze_backbone:
        freeze_backbone(model)
    if resume is not None:
        load_run_weights(model, resume["model"], plan.freeze_backbone, "resume")
    model.to(runtime.device)
    groups = _param_groups(cfg, model, plan)
    ema = EMA(model, cfg.train.ema_decay, follow=_followed(model, plan))
    if resume is not None:
        ema.load_state_dict(resume["ema"], strict=not plan.freeze_backbone)
    wrapped = runtime.wrap_model(_compiled(cfg, model, plan))
    optimizer = make_optimizer(cfg, groups, runtime.device)
    scaler = _scaler(cfg, runtime, plan)
    state = TrainState(model=wrapped, raw_model=model, ema=ema, optimizer=optimizer, scaler=scaler,
                       diffusion=build_diffusion(cfg), plan=plan, intervals=intervals, runtime=runtime, cfg=cfg,
                       null_class=batches.num_classes if batches.num_classes > 0 else None)
    state.spec, state.base_ref = spec, base_ref if plan.freeze_backbone else None
    if resume is not None:
        _load_resume(state, resume)
    return state


def _compiled(cfg: RunConfig, model: torch.nn.Module, plan) -> torch.nn.Module:
    """``train.compile``: the model under ``torch.compile``, except for combiners that read every
    layer's input and output gradient (PCGrad, Nash-MTL), which a compiled graph fuses away."""
    if not cfg.train.compile:
        return model
    if not plan.combiner.compilable:
        warnings.warn(f"train.compile: ANT-{plan.combiner.name} reads each layer's input and output gradient, "
                      f"which a compiled graph does not keep; the model runs without torch.compile", stacklevel=2)
        return model
    return torch.compile(model)


def make_optimizer(cfg: RunConfig, groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups``; ``train.adamw`` picks the implementation (one fused kernel on CUDA
    by default; the update is the same, only the order of float operations differs)."""
    kind = cfg.train.adamw if cfg.train.adamw != "auto" else ("fused" if device.type == "cuda" else "foreach")
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **flags)


def _check_same_plan(resume: Optional[dict], plan) -> None:
    if resume is None or "plan" not in resume:
        return
    was, now = resume["plan"].get("methods"), plan.describe()["methods"]
    if was != now:
        raise CheckpointError(f"resume: the checkpoint was written by methods {was}, this run has {now}; use the "
                              f"same methods as the run that wrote it (init_from starts a new run from its weights)")


def _base_weights(cfg: RunConfig, plan, resume: Optional[dict], init: Optional[dict]) -> Optional[dict]:
    """Backbone weights loaded before the transforms: the base of a frozen-backbone run (also on
    resume, where the checkpoint holds only the adapters), else ``init_from``'s EMA on a new run."""
    if plan.freeze_backbone:
        if init is None:
            where = (f"its base checkpoint ({resume['base'].get('uri', '?')}) was not loaded"
                     if resume is not None and resume.get("base") else "set init_from=RUN_OR_CHECKPOINT")
            raise ConfigError(f"init_from: methods {'+'.join(plan.key)} train on a frozen, pretrained "
                              f"backbone; {where}")
        check_frozen_base(init["config"], cfg, f"init_from={cfg.init_from}")
        return backbone_weights(init["ema"])
    if resume is None and init is not None:
        return backbone_weights(init["ema"])
    return None


def _param_groups(cfg: RunConfig, model: torch.nn.Module, plan) -> list[dict]:
    """AdamW groups: the model's trainable parameters, then every plug-in's declared group."""
    declared = [g for t in plan.transforms for g in t.param_groups(model)] + plan.weighter.param_groups()
    claimed = {id(p) for g in declared for p in g.params}
    default = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    tc = cfg.train
    groups = [{"params": default, "lr": tc.lr, "weight_decay": tc.weight_decay, "name": "model"}] if default else []
    for g in declared:
        groups.append({"params": [p for p in g.params if p.requires_grad], "name": g.name,
                       "lr": tc.lr if g.lr is None else g.lr,
                       "weight_decay": tc.weight_decay if g.weight_decay is None else g.weight_decay})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(f"methods: nothing to train (methods {'+'.join(plan.key) or 'vanilla'} froze every "
                          f"parameter)")
    return groups


def _followed(model: torch.nn.Module, plan) -> set[str]:
    """Names of parameters declared ``ema=False``: the EMA copy follows the live value."""
    ids = {id(p) for t in plan.transforms for g in t.param_groups(model) if not g.ema for p in g.params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


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
    state.plan.sync_pacer()
    state.step = int(resume["step"])


def make_state(state: TrainState) -> dict:
    """The checkpoint: enough to continue bit-for-bit. On a frozen backbone only the adapters are
    stored, with ``base`` saying where the backbone comes from."""
    model, ema = state.raw_model.state_dict(), state.ema.state_dict()
    if state.plan.freeze_backbone:
        model, ema = adapter_weights(model), adapter_weights(ema)
    out = {"format": FORMAT, "step": state.step, "model": model, "ema": ema,
           "optimizer": state.optimizer.state_dict(),
           "scaler": state.scaler.state_dict() if state.scaler is not None else {},
           "plugins": {name: obj.state_dict() for name, obj in state.plan.stateful().items()},
           "config": state.cfg.to_dict(), "intervals": state.intervals.to_list(),
           "model_spec": state.spec, "plan": state.plan.describe()}
    if state.base_ref is not None:
        out["base"] = dict(state.base_ref)
    return out


@torch.no_grad()
def sample_grid(model: torch.nn.Module, diffusion, cfg: RunConfig, *, image_size: int, channels: int,
                num_classes: int, n: int, device, seed: int = 0) -> torch.Tensor:
    """n EMA samples; class-conditional models cycle through the classes."""
    y = torch.arange(n, device=device) % num_classes if num_classes > 0 else None
    gen = torch.Generator().manual_seed(seed)
    return sample(model, diffusion, (n, channels, image_size, image_size), steps=cfg.sample.steps,
                  sampler=cfg.sample.sampler, y=y, null_class=num_classes if num_classes > 0 else None,
                  guidance=cfg.sample.guidance, eta=cfg.sample.eta, generator=gen, device=device,
                  clip_x0=cfg.clip_x0)


def _grid_png(state: TrainState, batches: BatchSource) -> bytes:
    images = sample_grid(state.ema.model, state.diffusion, state.cfg, image_size=batches.image_size,
                         channels=batches.channels, num_classes=batches.num_classes,
                         n=state.cfg.sample.n, device=state.runtime.device)
    decode = getattr(batches, "decode", None)       # latent data: the batch source's decoder -> images
    if decode is not None:
        images = decode(images)
    return png_bytes(make_grid(images, scale=max(1, 64 // images.shape[-1])))


class DivergenceWatch:
    """The first step whose global loss was not finite, tracked on the device, so the step need
    not wait for it; :meth:`check` reads it (the loop does so before it logs, samples or stores
    anything, so no checkpoint is ever written after the loss diverged)."""

    def __init__(self) -> None:
        self.first: Optional[torch.Tensor] = None       # [] int64: first bad step, 0 = none yet
        self.value: Optional[torch.Tensor] = None       # [] the loss sum at that step

    def update(self, out, step: int) -> None:
        loss = out.glob[1].sum()
        if self.first is None:
            self.first, self.value = torch.zeros((), dtype=torch.int64, device=loss.device), torch.zeros_like(loss)
        new = (self.first == 0) & ~out.finite()
        self.first = torch.where(new, step, self.first)
        self.value = torch.where(new, loss, self.value)

    def check(self, last_checkpoint: int) -> None:
        if self.first is None or int(self.first) == 0:
            return
        raise TrainingDiverged(f"train: loss became {float(self.value)} at step {int(self.first)}; the last good "
                               f"checkpoint (step {last_checkpoint}) is kept - lower train.lr or set train.grad_clip")


def train(cfg: RunConfig, runtime: Runtime, reporter: Reporter, batches: BatchSource, *,
          resume: Optional[dict] = None, init: Optional[dict] = None,
          intervals: Optional[Intervals] = None, base_ref: Optional[dict] = None) -> dict:
    """Train to ``cfg.train.steps``; returns a summary (final step, last metrics, timings)."""
    state = build_state(cfg, runtime, batches, resume=resume, init=init, intervals=intervals, base_ref=base_ref)
    tc, metrics, last_ckpt = cfg.train, {}, state.step if resume is not None else 0
    window_start, window_steps, started = time.perf_counter(), 0, time.perf_counter()
    images_per_step = cfg.train.batch_size
    watch, source = DivergenceWatch(), on_device(batches, runtime.device, tc.steps)
    for step in range(state.step, tc.steps):
        x0, y = source.get(step)
        out = device_step(state, x0, y, step)
        watch.update(out, step + 1)
        window_steps += 1
        done = state.step
        due = [done % tc.log_every == 0 or done == tc.steps, bool(tc.sample_every) and done % tc.sample_every == 0,
               done % tc.checkpoint_every == 0 or done == tc.steps]
        if not any(due):
            continue                                 # nothing to read: the device runs ahead
        watch.check(last_ckpt)                       # before anything is logged, sampled or stored
        metrics = out.resolve()
        if due[0]:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics.update(steps_per_s=window_steps / elapsed, images_per_s=window_steps * images_per_step / elapsed)
            metrics.update(state.plan.metrics())
            reporter.log(done, metrics)
            window_start, window_steps = time.perf_counter(), 0
        if due[1] and runtime.is_main:
            reporter.artifact(f"samples/step_{done:08d}.png", _grid_png(state, batches))
        if due[2]:
            heldout = getattr(batches, "heldout", None)
            if heldout is not None and runtime.is_main:
                metrics.update(heldout_losses(state.ema.model, state.diffusion, state.intervals, heldout,
                                              runtime.device))
                reporter.log(done, {k: v for k, v in metrics.items() if k.startswith("heldout/")})
            reporter.checkpoint(done, make_state(state) if runtime.is_main else None, metrics)
            last_ckpt = done
    if runtime.is_main and cfg.sample.n > 0:
        reporter.artifact("samples/final.png", _grid_png(state, batches))
    if runtime.is_main:
        for summary in state.plan.summaries:
            reporter.artifact(f"summaries/{summary.name}.json", json.dumps(summary(state.ema.model)).encode())
    summary = {"step": state.step, "metrics": metrics, "seconds": time.perf_counter() - started,
               "plan": state.plan.describe(), "intervals": state.intervals.pairs()}
    reporter.close(summary)
    return summary
