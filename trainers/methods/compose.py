"""Resolve the config's methods into one plan of slot owners (ARCHITECTURE.md §4).

``compose()`` refuses a single-owner slot claimed twice (naming both methods) and any combination
that is not in ``TESTED_COMBINATIONS``; ``Plan.describe()`` is what the run logs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainers.errors import ConfigError
from trainers.methods.combiners import NashCombiner, PCGradCombiner, SumCombiner
from trainers.methods.config import MethodsConfig
from trainers.methods.curriculum import build_clusters, build_pacer
from trainers.methods.dtr import DtrTransform
from trainers.methods.protocols import BuildContext
from trainers.methods.samplers import IntervalSampler
from trainers.methods.weighters import MeanWeighter, UncertaintyWeighter

__all__ = ["Plan", "compose", "TESTED_COMBINATIONS", "SINGLE_OWNER_SLOTS"]

# Combinations covered by tests/methods (interface tests run for each). Keys: sorted method names,
# with ANT's MTL spelled out because PCGrad/Nash do not compose with the curriculum.
TESTED_COMBINATIONS = {
    (), ("ant-uw",), ("ant-pcgrad",), ("ant-nash",), ("dtr",), ("curriculum",),
    ("ant-uw", "dtr"), ("ant-pcgrad", "dtr"), ("ant-nash", "dtr"),
    ("ant-uw", "curriculum"), ("curriculum", "dtr"), ("ant-uw", "curriculum", "dtr"),
}
SINGLE_OWNER_SLOTS = ("sampler_mode", "pacer", "weighter", "combiner")


@dataclass
class Plan:
    transforms: list = field(default_factory=list)
    sampler: Any = None
    weighter: Any = None
    combiner: Any = None
    owners: dict[str, str] = field(default_factory=dict)
    key: tuple[str, ...] = ()

    def describe(self) -> dict[str, str]:
        out = {"methods": "+".join(self.key) or "vanilla",
               "transforms": ",".join(t.name for t in self.transforms) or "none"}
        out.update({slot: self.owners.get(slot, "default") for slot in SINGLE_OWNER_SLOTS})
        return out

    def stateful(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "weighter": self.weighter, "combiner": self.combiner}


def _method_keys(methods: MethodsConfig) -> tuple[str, ...]:
    keys = []
    for name in methods.enabled():
        keys.append(f"ant-{methods.ant.mtl}" if name == "ant" else name)
    return tuple(sorted(keys))


def _claims(methods: MethodsConfig) -> list[tuple[str, str]]:
    """(slot, method) pairs in config order."""
    out = []
    if methods.ant is not None:
        out.append(("sampler_mode", "ant"))
        out.append(("weighter" if methods.ant.mtl == "uw" else "combiner", f"ant-{methods.ant.mtl}"))
    if methods.curriculum is not None:
        out.append(("pacer", "curriculum"))
    return out


def compose(methods: MethodsConfig, ctx: BuildContext, device: torch.device | str = "cpu") -> Plan:
    key = _method_keys(methods)
    owners: dict[str, str] = {}
    for slot, method in _claims(methods):
        if slot in owners:
            raise ConfigError(f"methods: {owners[slot]} and {method} both claim the {slot} slot; keep one")
        owners[slot] = method
    if key not in TESTED_COMBINATIONS:
        raise ConfigError(f"methods: the combination {' + '.join(key)} is not supported "
                          f"(ANT PCGrad/Nash need every interval each step, which the curriculum "
                          f"withholds); use methods.ant.mtl=uw with the curriculum")
    plan = Plan(owners=owners, key=key)
    if methods.dtr is not None:
        plan.transforms.append(DtrTransform(methods.dtr))
    plan.sampler = _sampler(methods, ctx)
    plan.weighter = MeanWeighter()
    plan.combiner = SumCombiner()
    ant = methods.ant
    if ant is not None and ant.mtl == "uw":
        plan.weighter = UncertaintyWeighter(ctx.intervals.num_intervals, ant.uw_lr, device)
    elif ant is not None and ant.mtl == "pcgrad":
        plan.combiner = PCGradCombiner(ctx.seed)
    elif ant is not None and ant.mtl == "nash":
        plan.combiner = NashCombiner(ctx.intervals.num_intervals, ant.nash_every, ant.nash_max_norm)
    return plan


def _sampler(methods: MethodsConfig, ctx: BuildContext) -> IntervalSampler:
    mode = "uniform"
    if methods.ant is not None and methods.ant.sampling == "stratified":
        mode = "stratified"
        k = ctx.intervals.num_intervals
        if ctx.local_batch % k:
            raise ConfigError(
                f"train.batch_size: the per-worker batch {ctx.local_batch} is not divisible by "
                f"intervals.count={k}, which ANT stratified sampling needs; use a multiple of "
                f"{k} per worker or methods.ant.sampling=iid")
    if methods.curriculum is None:
        return IntervalSampler(ctx.intervals, mode)
    clusters, order = build_clusters(methods.curriculum, ctx.num_timesteps)
    return IntervalSampler(ctx.intervals, mode, build_pacer(methods.curriculum), clusters, order)
