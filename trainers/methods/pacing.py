"""Curriculum clusters and pacing state machines (CURR).

Kim et al., "Denoising Task Difficulty-based Curriculum for Training Diffusion Models",
ICLR 2025 (arXiv 2403.10348); docs/methods.md, "Curriculum".

* Clusters are ``N`` uniform timestep intervals (an :class:`~trainers.methods.intervals.Intervals`
  built by the same resolver as ANT's, in ``curriculum.py``); cluster ``i`` is
  ``[⌊iT/N⌋, ⌊(i+1)T/N⌋)``.
* High-t clusters are *easy*: ``easy_to_hard`` visits cluster ``N−1`` first and cluster 0 last.
* Stage ``n ∈ 1..N`` trains on the first ``n`` clusters of the order (accumulating).

Pacers are pure state machines (no collectives): the caller feeds them a loss that is already
identical on every rank. ``CurriculumPacer`` (``curriculum.py``) binds them into the pacer slot.

Conventions resolved here:

* EMA smoothing: ``ℓ̃ ← ema·ℓ̃ + (1−ema)·ℓ``, seeded with the first loss of each stage, no bias
  correction; ``ema = 0`` monitors the raw loss. The EMA restarts at every stage change.
* ``patience`` mode is exactly the paper's loop (docs/methods.md): under a constant loss a stage lasts ``τ+1``
  updates (the first update sets ``best``; ``τ`` more without improvement advance).
* ``cap`` mode advances when the loss has converged (``converge_window`` updates without an
  improvement of more than ``δ``; default ``min(τ, 50)``) or when the stage has lasted ``τ``
  updates, whichever comes first.
* Fixed pacing: ``constant`` → every stage lasts ``stage_steps`` updates; ``linear`` → stage
  ``n`` lasts ``n·stage_steps`` updates. The last stage never ends.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from trainers.errors import CheckpointError, ConfigError, TrainingDiverged

__all__ = [
    "ORDERINGS",
    "cluster_order",
    "active_clusters",
    "AdaptivePacerConfig",
    "AdaptivePacerState",
    "AdaptivePacer",
    "FixedPacerConfig",
    "FixedPacerState",
    "FixedPacer",
]

ORDERINGS = ("easy_to_hard", "hard_to_easy", "random")
_ADAPTIVE_MODES = ("patience", "cap")
_FIXED_SCHEDULES = ("constant", "linear")
_DEFAULT_CONVERGE_WINDOW = 50


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_float(name: str, value: float, low: float, high: float, high_open: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name} must be a number in [{low}, {high}{bracket}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Orderings
# --------------------------------------------------------------------------------------------


def cluster_order(N: int, ordering: str, seed: int = 0) -> list[int]:
    """Order in which clusters join the curriculum.

    ``easy_to_hard`` (the method): ``[N−1, …, 0]``; ``hard_to_easy`` (anti): ``[0, …, N−1]``;
    ``random``: a permutation from a seeded CPU ``torch.Generator``.
    """
    _check_int("N", N, 1)
    if ordering == "easy_to_hard":
        return list(range(N - 1, -1, -1))
    if ordering == "hard_to_easy":
        return list(range(N))
    if ordering == "random":
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return [int(i) for i in torch.randperm(N, generator=gen)]
    raise ConfigError(f"ordering must be one of {', '.join(ORDERINGS)}, got {ordering!r}")


def active_clusters(order: list[int], stage: int) -> list[int]:
    """Clusters trained on at ``stage`` (1-based): the first ``stage`` entries of ``order``."""
    _check_int("stage", stage, 1)
    if stage > len(order):
        raise ConfigError(f"stage must be in [1, {len(order)}], got {stage}")
    return list(order[:stage])


# --------------------------------------------------------------------------------------------
# Shared state plumbing
# --------------------------------------------------------------------------------------------


def _load_state(state_cls: type, state: dict, num_stages: int, owner: str) -> object:
    """Build a state dataclass from ``state``, checking keys, types and the stage count."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{owner} state must be a dict, got {type(state).__name__}")
    expected = {f.name for f in fields(state_cls)} | {"num_stages"}
    if set(state) != expected:
        raise CheckpointError(
            f"{owner} state keys {sorted(state)} differ from {sorted(expected)}; "
            "resume with a checkpoint written by the same pacer type"
        )
    if state["num_stages"] != num_stages:
        raise CheckpointError(
            f"{owner} checkpoint has num_stages={state['num_stages']} but config has "
            f"{num_stages}; resume with the same number of curriculum stages"
        )
    values = {}
    for f in fields(state_cls):
        raw = state[f.name]
        caster = float if f.type in ("float", float) else int
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise CheckpointError(f"{owner} state field {f.name} must be a number, got {raw!r}")
        values[f.name] = caster(raw)
    if not 1 <= values["stage"] <= num_stages:
        raise CheckpointError(f"{owner} state stage={values['stage']} not in [1, {num_stages}]")
    return state_cls(**values)


# --------------------------------------------------------------------------------------------
# Adaptive pacing (the paper's pacing function)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptivePacerConfig:
    """Frozen settings of :class:`AdaptivePacer` (``patience`` is τ, ``delta`` is δ)."""

    num_stages: int
    patience: int
    delta: float = 0.0
    ema: float = 0.0
    mode: str = "patience"
    converge_window: int | None = None

    def __post_init__(self) -> None:
        _check_int("num_stages", self.num_stages, 1)
        _check_int("patience", self.patience, 1)
        _check_float("delta", self.delta, 0.0, math.inf, True)
        _check_float("ema", self.ema, 0.0, 1.0, True)
        if self.mode not in _ADAPTIVE_MODES:
            modes = ", ".join(_ADAPTIVE_MODES)
            raise ConfigError(f"mode must be one of {modes}, got {self.mode!r}")
        if self.converge_window is not None:
            _check_int("converge_window", self.converge_window, 1)

    @property
    def window(self) -> int:
        """Updates without improvement that count as converged."""
        if self.mode == "patience":
            return self.patience
        if self.converge_window is not None:
            return self.converge_window
        return min(self.patience, _DEFAULT_CONVERGE_WINDOW)


@dataclass
class AdaptivePacerState:
    """Mutable state; plain ints/floats so ``torch.save`` / ``weights_only`` load round-trips."""

    stage: int = 1
    best: float = math.inf
    count: int = 0
    stage_steps: int = 0
    step: int = 0
    smoothed: float = math.nan  # undefined until the first update of a stage


class AdaptivePacer:
    """Loss-driven stage controller: ``update(loss)`` once per step (or eval interval)."""

    def __init__(
        self,
        num_stages: int,
        patience: int,
        delta: float = 0.0,
        ema: float = 0.0,
        mode: str = "patience",
        converge_window: int | None = None,
    ) -> None:
        self.config = AdaptivePacerConfig(num_stages, patience, delta, ema, mode, converge_window)
        self.state = AdaptivePacerState()

    @property
    def stage(self) -> int:
        return self.state.stage

    @property
    def finished(self) -> bool:
        return self.state.stage == self.config.num_stages

    def num_active(self) -> int:
        """Number of active clusters (= current stage)."""
        return self.state.stage

    def _smooth(self, loss: float) -> float:
        s, beta = self.state, self.config.ema
        s.smoothed = loss if s.stage_steps == 1 else beta * s.smoothed + (1.0 - beta) * loss
        return s.smoothed

    def _should_advance(self) -> bool:
        s, cfg = self.state, self.config
        if self.finished:
            return False
        if s.count >= cfg.window:
            return True
        return cfg.mode == "cap" and s.stage_steps >= cfg.patience

    def update(self, loss: float) -> bool:
        """Feed one monitored loss; returns True iff the stage advanced on this update."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"curriculum pacer got a non-finite loss ({loss}) at update {self.state.step + 1}"
            )
        s = self.state
        s.step += 1
        s.stage_steps += 1
        value = self._smooth(loss)
        if value < s.best - self.config.delta:
            s.best, s.count = value, 0
        else:
            s.count += 1
        if not self._should_advance():
            return False
        self.state = AdaptivePacerState(stage=s.stage + 1, step=s.step)
        return True

    def metrics(self) -> dict[str, float]:
        s = self.state
        return {
            "stage": float(s.stage),
            "best": float(s.best),
            "count": float(s.count),
            "stage_steps": float(s.stage_steps),
            "smoothed_loss": float(s.smoothed),
        }

    def state_dict(self) -> dict[str, float | int]:
        return {**asdict(self.state), "num_stages": self.config.num_stages}

    def load_state_dict(self, state: dict) -> None:
        self.state = _load_state(AdaptivePacerState, state, self.config.num_stages, "AdaptivePacer")


# --------------------------------------------------------------------------------------------
# Fixed pacing (a baseline; not in the paper)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPacerConfig:
    """Frozen settings of :class:`FixedPacer`."""

    num_stages: int
    stage_steps: int
    schedule: str = "constant"

    def __post_init__(self) -> None:
        _check_int("num_stages", self.num_stages, 1)
        _check_int("stage_steps", self.stage_steps, 1)
        if self.schedule not in _FIXED_SCHEDULES:
            raise ConfigError(
                f"schedule must be one of {', '.join(_FIXED_SCHEDULES)}, got {self.schedule!r}"
            )

    def stage_length(self, stage: int) -> int:
        """Updates spent in ``stage`` (1-based) before advancing."""
        return self.stage_steps * (stage if self.schedule == "linear" else 1)


@dataclass
class FixedPacerState:
    stage: int = 1
    stage_steps: int = 0
    step: int = 0


class FixedPacer:
    """Step-count stage controller; the loss passed to ``update`` is ignored."""

    def __init__(self, num_stages: int, stage_steps: int, schedule: str = "constant") -> None:
        self.config = FixedPacerConfig(num_stages, stage_steps, schedule)
        self.state = FixedPacerState()

    @property
    def stage(self) -> int:
        return self.state.stage

    @property
    def finished(self) -> bool:
        return self.state.stage == self.config.num_stages

    def num_active(self) -> int:
        """Number of active clusters (= current stage)."""
        return self.state.stage

    def update(self, loss: float | None = None) -> bool:
        """Count one step; returns True iff the stage advanced on this update."""
        s = self.state
        s.step += 1
        s.stage_steps += 1
        if self.finished or s.stage_steps < self.config.stage_length(s.stage):
            return False
        s.stage, s.stage_steps = s.stage + 1, 0
        return True

    def metrics(self) -> dict[str, float]:
        s = self.state
        return {"stage": float(s.stage), "stage_steps": float(s.stage_steps)}

    def state_dict(self) -> dict[str, int]:
        return {**asdict(self.state), "num_stages": self.config.num_stages}

    def load_state_dict(self, state: dict) -> None:
        self.state = _load_state(FixedPacerState, state, self.config.num_stages, "FixedPacer")
