"""MEME: Multi-Architecture Multi-Expert diffusion (Lee et al., AAAI 2024, arXiv 2306.04990;
docs/methods.md, "MEME").

N experts, one per interval of the run's shared timestep partition (``intervals:``, uniform by
default, any ANT rule works), each a network of its own architecture (any registered model; the
U-Net family's inception mixers shift the conv/attention balance per expert and stage). Experts are
independent runs: expert n is an ordinary run whose sampler draws ``t`` from its interval with
probability p_n and otherwise from the full range (soft interval assignment). At inference a
router sends each timestep to the expert of its interval.

* ``ratio(n, stage) = r0 · γ_t^n · γ_d^stage`` (0-based) is the d_h : d_l ratio of expert n's
  mixers at a stage, converted to the U-Net's ``high`` fraction ``ratio / (1 + ratio)``.
* p schedules: ``hard`` (1 for every expert), ``constant`` (``p``), ``decreasing``
  (``p · decay^n``: 0.8, 0.4, 0.2, 0.1 for N = 4, the paper's best), ``explicit`` (``probabilities``).
* Outside its interval an expert draws from the full range (the paper says only "with
  probability p_n"; **our reading**) or, with ``outside: neighbours``, from the adjacent intervals.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn as nn

from trainers.errors import ConfigError
from trainers.methods.intervals import Intervals
from trainers.methods.protocols import BuildContext, Contribution
from trainers.methods.registry import MethodDescriptor, register
from trainers.methods.samplers import RestrictableSampler

__all__ = ["RampConfig", "MemeConfig", "SoftIntervalSampler", "expert_probability", "ramp_high", "expert_configs",
           "ExpertRouter", "DESCRIPTOR"]


@dataclass(frozen=True)
class RampConfig:
    """The parametric d_h : d_l ratio of expert n at stage s: r0 · γ_t^n · γ_d^s."""
    r0: float = 0.85
    gamma_t: float = 0.74
    gamma_d: float = 0.73

    def __post_init__(self) -> None:
        if min(self.r0, self.gamma_t, self.gamma_d) <= 0:
            raise ConfigError("methods.meme.ramp: r0, gamma_t and gamma_d must be > 0")


@dataclass(frozen=True)
class MemeConfig:
    expert: Optional[int] = None           # which expert this run trains (null: the set; see `denoiselab experts`)
    soft: Literal["hard", "constant", "decreasing", "explicit"] = "decreasing"
    p: float = 0.8                          # constant p, or p_1 of the decreasing schedule
    decay: float = 0.5                      # decreasing: p_n = p · decay^n
    probabilities: Optional[tuple[float, ...]] = None    # explicit: one per expert
    outside: Literal["full", "neighbours"] = "full"
    experts: Optional[tuple[dict[str, Any], ...]] = None  # per-expert model {name, arch}; default: the run's model
    ramp: Optional[RampConfig] = None       # U-Net experts: mixer ratios from the ramp
    identical: bool = False                 # the control: every expert gets the run's model as is
    baseline: Optional[str] = None          # a single model (e.g. UNet-S) the set's cost is compared with
    lazy: bool = False                      # sampling keeps only the active expert in memory

    def __post_init__(self) -> None:
        if self.expert is not None and self.expert < 0:
            raise ConfigError("methods.meme.expert: must be >= 0 (an index into the intervals)")
        for name, value in (("p", self.p), ("decay", self.decay)):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"methods.meme.{name}: must be in (0, 1]")
        if self.soft == "explicit" and not self.probabilities:
            raise ConfigError("methods.meme.probabilities: required for soft: explicit, one per expert")
        if self.probabilities and not all(0.0 < q <= 1.0 for q in self.probabilities):
            raise ConfigError("methods.meme.probabilities: each must be in (0, 1]")


def expert_probability(cfg: MemeConfig, n: int, num_experts: int) -> float:
    """p_n: the probability expert n draws t from its own interval."""
    if cfg.soft == "hard":
        return 1.0
    if cfg.soft == "constant":
        return cfg.p
    if cfg.soft == "decreasing":
        return cfg.p * cfg.decay ** n
    if len(cfg.probabilities) != num_experts:
        raise ConfigError(f"methods.meme.probabilities: {len(cfg.probabilities)} values for {num_experts} experts "
                          f"(intervals.count); give one per expert")
    return cfg.probabilities[n]


def ramp_high(ramp: RampConfig, n: int, stages: int) -> tuple[float, ...]:
    """The U-Net ``high`` fractions (d_h / (d_h + d_l)) of expert n, stage by stage."""
    ratios = [ramp.r0 * ramp.gamma_t ** n * ramp.gamma_d ** s for s in range(stages)]
    return tuple(round(r / (1.0 + r), 6) for r in ratios)


class SoftIntervalSampler(RestrictableSampler):
    """Expert n's sampler: t ~ U(interval n) with probability p_n, else U(full range or neighbours)."""

    name = "meme-soft"

    def __init__(self, intervals: Intervals, expert: int, p: float, outside: str = "full"):
        self.expert, self.p, self.outside = expert, p, outside
        super().__init__(intervals)

    def restrict(self, allowed: torch.Tensor) -> None:
        super().restrict(allowed)
        lo, hi = self.intervals.pairs()[self.expert]
        self.home = torch.arange(lo, hi)
        if self.outside == "full":
            self.away = self.positions
        else:
            pairs = self.intervals.pairs()
            near = [pairs[j] for j in (self.expert - 1, self.expert + 1) if 0 <= j < len(pairs)]
            self.away = torch.cat([torch.arange(a, b) for a, b in near]) if near else self.home

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inside = torch.rand(n, generator=generator) < self.p                            # [n]
        t_home = self.home[torch.randint(len(self.home), (n,), generator=generator)]
        t_away = self.away[torch.randint(len(self.away), (n,), generator=generator)]
        return torch.where(inside, t_home, t_away), torch.ones(n)

    def metrics(self) -> dict[str, float]:
        lo, hi = self.intervals.pairs()[self.expert]
        return {"meme/expert": float(self.expert), "meme/p": self.p, "meme/interval_lo": float(lo),
                "meme/interval_hi": float(hi)}


def _build(cfg: MemeConfig, ctx: BuildContext) -> Contribution:
    num = ctx.intervals.num_intervals
    if cfg.expert is None:
        raise ConfigError("methods.meme.expert: this config describes a whole expert set; train it with "
                          "`denoiselab experts CONFIG`, or one expert with --set methods.meme.expert=N")
    if cfg.expert >= num:
        raise ConfigError(f"methods.meme.expert: {cfg.expert} but intervals.count={num} experts (0..{num - 1})")
    return Contribution(sampler=SoftIntervalSampler(ctx.intervals, cfg.expert, expert_probability(cfg, cfg.expert, num),
                                                    cfg.outside))


def expert_configs(cfg) -> list:
    """The N run configs of an expert-set config: expert n gets its model (the ``experts`` list,
    the ramp's mixer ratios, or the run's model) and ``methods.meme.expert = n``; names
    ``<set>-expert<n>``. Experts draw no sample grid and run no evaluation of their own: an
    expert alone denoises its interval, not the whole chain, so samples and FD are the set's,
    through the router (a study's trial, ``denoiselab sample|evaluate SET``)."""
    from trainers.models.registry import stage_count
    meme: MemeConfig = cfg.methods.meme
    if meme is None:
        raise ConfigError("methods.meme: an expert set needs the meme method (methods: {meme: {...}})")
    if not cfg.name:
        raise ConfigError("name: an expert set needs a name (its experts are <name>-expert<n>)")
    num = cfg.intervals.count if cfg.intervals.rule != "explicit" else len(cfg.intervals.pairs)
    if meme.experts is not None and len(meme.experts) != num:
        raise ConfigError(f"methods.meme.experts: {len(meme.experts)} entries for intervals.count={num}; give one "
                          f"model per expert")
    out = []
    for n in range(num):
        model = dataclasses.asdict(cfg.model)
        if meme.experts is not None and not meme.identical:
            model = {**model, **meme.experts[n]}
        if meme.ramp is not None and not meme.identical:
            stages = stage_count(model["name"], model.get("arch") or {})
            if stages is None:
                raise ConfigError(f"methods.meme.ramp: sets the mixer ratios of U-Net experts; {model['name']} has "
                                  f"no mixers (use a UNet-<size> model, or list methods.meme.experts)")
            model["arch"] = {**(model.get("arch") or {}), "high": list(ramp_high(meme.ramp, n, stages))}
        data = cfg.to_dict()
        data.update(name=f"{cfg.name}-expert{n}", model=model, eval={**data["eval"], "n": 0},
                    sample={**data["sample"], "n": 0})
        data["methods"]["meme"] = {**data["methods"]["meme"], "expert": n}
        out.append(data)
    from trainers.config import load_config
    return [load_config(d) for d in out]


class ExpertRouter(nn.Module):
    """Hard routing at inference: each sample goes to the expert of its timestep's interval.

    ``experts`` are modules, or zero-argument loaders when ``lazy`` (only the active expert is
    resident: sampling walks t downwards, so each expert is loaded once per pass)."""

    def __init__(self, intervals: Intervals, experts: Sequence, lazy: bool = False):
        super().__init__()
        self.intervals, self.lazy = intervals, lazy
        if len(experts) != intervals.num_intervals:
            raise ConfigError(f"expert set: {len(experts)} experts for {intervals.num_intervals} intervals")
        if lazy:
            self.loaders, self.resident = list(experts), {}
        else:
            self.experts = nn.ModuleList(experts)

    def expert(self, n: int) -> nn.Module:
        if not self.lazy:
            return self.experts[n]
        if n not in self.resident:
            self.resident.clear()                                  # free the previous expert first
            self.resident[n] = self.loaders[n]()
        return self.resident[n]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        task = self.intervals.task_id(t)                                              # [N]
        out = None
        for n in torch.unique(task).tolist():
            rows = torch.nonzero(task == n).flatten()
            part = self.expert(n)(x[rows], t[rows], None if y is None else y[rows])
            if out is None:
                out = x.new_zeros((x.shape[0], *part.shape[1:]))
            out[rows] = part.to(out.dtype)
        return out


DESCRIPTOR = register(MethodDescriptor(
    name="meme", config=MemeConfig, build=_build, claims=lambda cfg: ("sampler",),
    examples={"meme": {"expert": 1, "soft": "decreasing"}}, tested_with=(("dtr", "meme"),),
    refusal="a MEME expert draws its own timesteps; the other samplers (ANT) and pacers (curriculum) "
            "do not combine with it",
    summary="an expert of its own architecture per timestep interval, trained in parallel (Lee et al., AAAI 2024)"))
