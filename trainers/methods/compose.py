"""Resolve the config's methods into one plan of slot owners (docs/architecture.md, "slots").

``compose()`` walks the method registry: each enabled method's descriptor names the slots it
claims and builds its :class:`~trainers.methods.protocols.Contribution`. A single-owner slot
claimed twice is refused naming both methods; a combination of methods that no descriptor lists
as tested is refused with the owning method's reason. Slots nobody claims get their defaults
(uniform sampler, no pacer, mean weighter, sum combiner). ``Plan.describe()`` is what runs log.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from trainers.errors import ConfigError
from trainers.methods.combiners import SumCombiner
from trainers.methods.config import MethodsConfig
from trainers.methods.protocols import (AuxLoss, BuildContext, Contribution, GradientCombiner, LossWeighter,
                                        ModelTransform, Pacer, Summary, TimestepSampler)
from trainers.methods.registry import METHODS, SINGLE_OWNER_SLOTS, supported_combinations
from trainers.methods.samplers import UniformSampler
from trainers.methods.weighters import MeanWeighter

__all__ = ["Plan", "NullPacer", "compose", "combination_key"]


class NullPacer:
    """No pacer: every timestep allowed, nothing to observe."""
    name = "none"
    monitor = "mse"
    watches = False                   # the step need not read the loss to the host for it

    def __init__(self, num_timesteps: int):
        self._all = torch.ones(num_timesteps, dtype=torch.bool)

    def allowed(self) -> torch.Tensor:
        return self._all

    def observe(self, loss: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}


@dataclass
class Plan:
    sampler: TimestepSampler
    pacer: Pacer
    weighter: LossWeighter
    combiner: GradientCombiner
    transforms: list[ModelTransform] = field(default_factory=list)
    aux_losses: list[AuxLoss] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    freeze_backbone: bool = False
    owners: dict[str, str] = field(default_factory=dict)
    key: tuple[str, ...] = ()

    def describe(self) -> dict[str, str]:
        out = {"methods": "+".join(self.key) or "vanilla",
               "transforms": ",".join(t.name for t in self.transforms) or "none"}
        out.update({slot: self.owners.get(slot, "default") for slot in SINGLE_OWNER_SLOTS})
        if self.freeze_backbone:
            out["backbone"] = "frozen"
        return out

    def stateful(self) -> dict[str, object]:
        return {"sampler": self.sampler, "pacer": self.pacer, "weighter": self.weighter, "combiner": self.combiner}

    def begin_step(self, model, step: int, rank: int) -> None:
        """Before each training forward (transforms with per-step randomness reseed here)."""
        for transform in self.transforms:
            transform.begin_step(model, step, rank)

    def sync_pacer(self) -> None:
        """Hand the pacer's allowed timesteps to the sampler (after build, load and every move)."""
        self.sampler.restrict(self.pacer.allowed())

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for obj in self.stateful().values():
            out.update(obj.metrics())
        return out


def combination_key(methods: MethodsConfig) -> tuple[str, ...]:
    """Sorted variant keys of the enabled methods, e.g. ``("ant-uw", "dtr")``."""
    return tuple(sorted(METHODS[name].variant(cfg) for name, cfg in methods.items()))


def _check(methods: MethodsConfig) -> tuple[dict[str, str], tuple[str, ...]]:
    owners: dict[str, str] = {}
    for name, cfg in methods.items():
        desc = METHODS[name]
        for slot in desc.slots(cfg):
            if slot in SINGLE_OWNER_SLOTS and slot in owners:
                raise ConfigError(f"methods: {owners[slot]} and {desc.variant(cfg)} both claim the {slot} slot; "
                                  f"keep one")
            if slot in SINGLE_OWNER_SLOTS:
                owners[slot] = desc.variant(cfg)
    key = combination_key(methods)
    if key not in supported_combinations():
        reasons = [METHODS[n].refusal for n in methods.enabled() if METHODS[n].refusal]
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise ConfigError(f"methods: the combination {' + '.join(key)} is not supported{why}")
    return owners, key


def compose(methods: MethodsConfig, ctx: BuildContext, device: Optional[torch.device | str] = None) -> Plan:
    """The plan for ``methods`` (validated first: slot owners, tested combinations)."""
    if device is not None:
        ctx = BuildContext(**{**ctx.__dict__, "device": torch.device(device)})
    owners, key = _check(methods)
    parts: list[Contribution] = [METHODS[name].build(cfg, ctx) for name, cfg in methods.items()]

    def owner(slot: str, default):
        found = [getattr(p, slot) for p in parts if getattr(p, slot) is not None]
        return found[0] if found else default()

    plan = Plan(sampler=owner("sampler", lambda: UniformSampler(ctx.intervals)),
                pacer=owner("pacer", lambda: NullPacer(ctx.num_timesteps)),
                weighter=owner("weighter", MeanWeighter),
                combiner=owner("combiner", SumCombiner),
                transforms=[t for p in parts for t in p.transforms],
                aux_losses=[a for p in parts for a in p.aux_losses],
                summaries=[m for p in parts for m in p.summaries],
                freeze_backbone=any(p.freeze_backbone for p in parts), owners=owners, key=key)
    plan.sync_pacer()
    return plan
