"""Build the pieces of a run from its config: intervals, diffusion, model (+ transforms), plan.

Used by the training loop, by sampling and by evaluation, so a checkpoint is always rebuilt with
the same code path that trained it. The network is built in stages (``trainers/weights.py``):
backbone, then base weights, then the plan's transforms.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainers.config import RunConfig
from trainers.diffusion import GaussianDiffusion
from trainers.diffusion.schedule import snr as snr_of
from trainers.errors import CheckpointError, ConfigError, DataError
from trainers.methods import BuildContext, Intervals, Plan, compose, resolve_intervals
from trainers.models import build_model, model_spec, spec_to_dict
from trainers.weights import load_backbone

__all__ = ["resolve_run_intervals", "resume_check", "build_diffusion", "build_network", "build_context", "load_affinity",
           "build_all", "network_from_state", "expert_set_from_state"]


def read_affinity(path: str, field: str = "intervals.artifact") -> tuple[np.ndarray, Optional[list[int]]]:
    """Task-affinity matrix [T, T] from a local ``.npz`` written by ``denoiselab affinity``, and the
    interval boundaries its DP chose when the file holds them; errors name `field`."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{field}: {path} not found; run `denoiselab affinity` first "
                        f"or point at its tas.npz")
    try:
        with np.load(p) as data:
            bounds = [int(b) for b in data["bounds"]] if "bounds" in data.files else None
            return np.asarray(data["tas"], dtype=np.float64), bounds
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"{field}: {path} is not a task-affinity artifact ({err})") from None


def load_affinity(path: str) -> np.ndarray:
    """Task-affinity matrix [T, T] from a local ``.npz`` written by ``denoiselab affinity``."""
    return read_affinity(path)[0]


def resolve_run_intervals(cfg: RunConfig, tas: Optional[np.ndarray] = None) -> tuple[Intervals, float]:
    icfg, steps = cfg.intervals, cfg.diffusion.steps
    snr = snr_of(cfg.diffusion.schedule, steps)
    if icfg.rule == "affinity":
        tas = tas if tas is not None else load_affinity(icfg.artifact)
        if tas.shape != (steps, steps):
            raise ConfigError(f"intervals.artifact: affinity matrix is {tas.shape}, expected "
                              f"({steps}, {steps}) for diffusion.steps={steps}")
    pairs = [tuple(p) for p in icfg.pairs] if icfg.pairs else None
    count = len(pairs) if icfg.rule == "explicit" else icfg.count
    return resolve_intervals(icfg.rule, steps, count, snr=snr, tas=tas, pairs=pairs, min_width=icfg.min_width)


def build_diffusion(cfg: RunConfig) -> GaussianDiffusion:
    return GaussianDiffusion.from_config(cfg.diffusion.schedule, cfg.diffusion.steps, cfg.diffusion.learn_sigma)


def build_context(cfg: RunConfig, intervals: Intervals, world_size: int,
                  device: str | torch.device = "cpu") -> BuildContext:
    return BuildContext(intervals=intervals, num_timesteps=cfg.diffusion.steps,
                        snr=snr_of(cfg.diffusion.schedule, cfg.diffusion.steps),
                        local_batch=cfg.train.batch_size // world_size, world_size=world_size,
                        seed=cfg.train.seed, device=torch.device(device))


def build_network(cfg: RunConfig, *, image_size: int, channels: int, num_classes: int, plan: Plan,
                  ctx: BuildContext, seed: int, base: Optional[dict] = None,
                  base_source: str = "init_from") -> tuple[torch.nn.Module, dict]:
    """The network, its base weights (``base``: backbone keys, optional) loaded before the plan's
    transforms are applied, and its spec as a plain dict (with the model family)."""
    spec = model_spec(cfg.model, image_size=image_size, channels=channels, num_classes=num_classes,
                      learn_sigma=cfg.diffusion.learn_sigma)
    torch.manual_seed(seed)                      # identical initial weights on every rank
    model = build_model(spec)
    if base is not None:
        load_backbone(model, base, base_source)
    for transform in plan.transforms:
        model = transform.apply(model, ctx)
    return model, spec_to_dict(spec)


def resume_check(cfg: RunConfig, *, image_size: int, channels: int, num_classes: int):
    """``check(state, label)`` for :func:`trainers.checkpoint.first_usable`: refuses another
    model's checkpoint (a different spec) before the loop would."""
    from trainers.checkpoint import check_compatible
    spec = spec_to_dict(model_spec(cfg.model, image_size=image_size, channels=channels, num_classes=num_classes,
                                   learn_sigma=cfg.diffusion.learn_sigma))

    def check(state: dict, label: str) -> None:
        check_compatible(state, spec, label)
    return check


def build_all(cfg: RunConfig, *, image_size: int, channels: int, num_classes: int, world_size: int = 1,
              device: str | torch.device = "cpu", intervals: Optional[Intervals] = None):
    """Convenience for sampling/evaluation: (model, diffusion, plan, intervals, spec)."""
    if intervals is None:
        intervals, _ = resolve_run_intervals(cfg)
    ctx = build_context(cfg, intervals, world_size)
    plan = compose(cfg.methods, ctx, device)
    model, spec = build_network(cfg, image_size=image_size, channels=channels, num_classes=num_classes,
                                plan=plan, ctx=ctx, seed=cfg.train.seed)
    return model, build_diffusion(cfg), plan, intervals, spec


def network_from_state(state: dict, use_ema: bool = True, base: Optional[dict] = None,
                       device: str | torch.device = "cpu"):
    """(network, diffusion, cfg, spec) rebuilt from a checkpoint state, for sampling and evaluation.

    A checkpoint of a frozen-backbone run holds only its adapters: ``base`` (the backbone weights
    it references, already checked by the caller) must be given."""
    from trainers.config import load_config
    from trainers.checkpoint import check_compatible
    from trainers.weights import load_run_weights
    cfg = load_config(state["config"])
    spec = state["model_spec"]
    frozen = state.get("base") is not None
    if frozen and base is None:
        raise CheckpointError(f"checkpoint of run {cfg.name or '?'}: patches a base checkpoint "
                              f"({state['base'].get('uri', '?')}) that was not loaded; open it with "
                              f"denoiselab sample/evaluate, which fetch the base")
    intervals = Intervals.from_list(state["intervals"])
    ctx = build_context(cfg, intervals, 1)
    plan = compose(cfg.methods, ctx, device)
    model, built = build_network(cfg, image_size=spec["image_size"], channels=spec["channels"],
                                 num_classes=spec["num_classes"], plan=plan, ctx=ctx, seed=cfg.train.seed,
                                 base=base, base_source=f"base of run {cfg.name or '?'}")
    check_compatible(state, built)
    load_run_weights(model, state["ema"] if use_ema else state["model"], frozen, "checkpoint")
    return model.to(device).eval(), build_diffusion(cfg), cfg, spec


def expert_set_from_state(state: dict, device: str | torch.device = "cpu"):
    """(router, diffusion, cfg, spec) for an expert-set state (``kind: expert_set``): every expert
    rebuilt from its own checkpoint, hard-routed by the set's intervals (MEME)."""
    import functools
    from trainers.config import load_config
    from trainers.methods.meme import ExpertRouter
    cfg = load_config(state["config"])
    specs = [s["model_spec"] for s in state["experts"]]
    keys = ("image_size", "channels", "num_classes", "learn_sigma")
    for n, spec in enumerate(specs[1:], start=1):
        if any(spec[k] != specs[0][k] for k in keys):
            raise CheckpointError(f"expert set {state.get('name', '?')}: expert {n} has geometry "
                                  f"{[spec[k] for k in keys]}, expert 0 {[specs[0][k] for k in keys]}; the experts "
                                  f"of a set must share data geometry and learn_sigma")
    for n, expert in enumerate(state["experts"]):
        theirs = load_config(expert["config"]).diffusion
        if theirs != cfg.diffusion:
            raise CheckpointError(f"expert set {state.get('name', '?')}: expert {n} was trained with {theirs}, the "
                                  f"set has {cfg.diffusion}; the experts of a set share one diffusion process")
    load = lambda s: network_from_state(s, device=device)[0]           # noqa: E731
    lazy = bool(cfg.methods.meme is not None and cfg.methods.meme.lazy)
    experts = [functools.partial(load, s) for s in state["experts"]] if lazy else [load(s) for s in state["experts"]]
    router = ExpertRouter(Intervals.from_list(state["intervals"]), experts, lazy=lazy)
    return router.eval(), build_diffusion(cfg), cfg, specs[0]
