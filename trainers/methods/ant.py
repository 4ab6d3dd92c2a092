"""ANT: Addressing Negative Transfer in diffusion models (Go et al., NeurIPS 2023, arXiv 2306.00354;
docs/methods.md, "ANT"). Timesteps are clustered into intervals (``intervals.py``, the run's
``intervals:`` section) and the intervals are treated as tasks for multi-task optimisation:
Uncertainty Weighting (a loss weighter), PCGrad or Nash-MTL (gradient combiners). ANT also owns
the sampler slot: stratified over the intervals (the paper's batching) or i.i.d.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainers.errors import ConfigError
from trainers.methods.combiners import NashCombiner, PCGradCombiner
from trainers.methods.protocols import BuildContext, Contribution
from trainers.methods.registry import MethodDescriptor, register
from trainers.methods.samplers import StratifiedSampler, UniformSampler
from trainers.methods.weighters import UncertaintyWeighter

__all__ = ["AntConfig", "DESCRIPTOR"]


@dataclass(frozen=True)
class AntConfig:
    mtl: Literal["uw", "pcgrad", "nash"] = "uw"
    sampling: Literal["stratified", "iid"] = "stratified"
    uw_lr: float = 0.025               # own AdamW param group, weight decay 0
    nash_every: int = 25               # refresh α every N steps
    nash_max_norm: float = 1.0         # global grad-norm clip on the Nash path
    pcgrad_reduction: Literal["mean", "sum"] = "mean"   # of the projected interval gradients
    # PCGrad/Nash: hold every layer's K interval gradients for the update ([K, P] floats) or
    # recompute the update as one more weight-gradient pass (memory of one layer's K gradients)
    interval_grads: Literal["keep", "recompute"] = "keep"

    def __post_init__(self) -> None:
        if self.uw_lr <= 0:
            raise ConfigError("methods.ant.uw_lr: must be > 0 (paper: 0.025)")
        if self.nash_every < 1:
            raise ConfigError("methods.ant.nash_every: must be >= 1 (paper: 25)")
        if self.nash_max_norm <= 0:
            raise ConfigError("methods.ant.nash_max_norm: must be > 0 (paper: 1.0)")


def _sampler(cfg: AntConfig, ctx: BuildContext):
    if cfg.sampling == "iid":
        return UniformSampler(ctx.intervals)
    k = ctx.intervals.num_intervals
    if ctx.local_batch % k:
        raise ConfigError(
            f"train.batch_size: the per-worker batch {ctx.local_batch} is not divisible by "
            f"intervals.count={k}, which ANT stratified sampling needs; use a multiple of "
            f"{k} per worker or methods.ant.sampling=iid")
    return StratifiedSampler(ctx.intervals)


def _build(cfg: AntConfig, ctx: BuildContext) -> Contribution:
    out = Contribution(sampler=_sampler(cfg, ctx))
    k = ctx.intervals.num_intervals
    if cfg.mtl == "uw":
        out.weighter = UncertaintyWeighter(k, cfg.uw_lr, ctx.device)
    elif cfg.mtl == "pcgrad":
        out.combiner = PCGradCombiner(ctx.seed, cfg.pcgrad_reduction, cfg.interval_grads)
    else:
        out.combiner = NashCombiner(k, cfg.nash_every, cfg.nash_max_norm, cfg.interval_grads)
    return out


DESCRIPTOR = register(MethodDescriptor(
    name="ant", config=AntConfig, build=_build,
    claims=lambda cfg: ("sampler", "weighter" if cfg.mtl == "uw" else "combiner"),
    variant=lambda cfg: f"ant-{cfg.mtl}", variants=("ant-uw", "ant-pcgrad", "ant-nash"),
    examples={"ant-uw": {"mtl": "uw"}, "ant-pcgrad": {"mtl": "pcgrad"}, "ant-nash": {"mtl": "nash", "nash_every": 2}},
    summary="intervals as tasks for multi-task optimisation: UW, PCGrad, Nash-MTL (Go et al., NeurIPS 2023)"))
