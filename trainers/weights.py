"""Staged weight loading (docs/architecture.md, "staged loading").

1. The backbone is built from the model registry.
2. Base weights (``init_from``: another run's EMA by default) load into the backbone *before* any
   transform is applied, so they only ever see backbone keys.
3. Transforms attach their adapters (``adapters.<name>.*``) and initialise what they add.
4. A resumed run loads its own state on top: every key, or only the adapter keys when the run
   trains on a frozen backbone (its checkpoints reference the base instead of copying it).

The split between "backbone" and "what a method added" is the adapter prefix of the model
contract (``trainers/models/contract.py``); nothing here names a method.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from trainers.errors import CheckpointError

__all__ = ["ADAPTER_PREFIX", "is_adapter_key", "backbone_weights", "adapter_weights", "load_backbone",
           "load_run_weights", "freeze_backbone", "check_frozen_base"]

ADAPTER_PREFIX = "adapters."


def is_adapter_key(key: str) -> bool:
    return key.startswith(ADAPTER_PREFIX)


def backbone_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if not is_adapter_key(k)}


def adapter_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if is_adapter_key(k)}


def _first_line(err: Exception) -> str:
    """The informative part of a load_state_dict error (its first line is only a header)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else ""
    return detail[:200]


def load_backbone(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Base weights into a backbone that has no adapters yet (step 2)."""
    extra = sorted({k.split(".")[1] for k in weights if is_adapter_key(k)})
    if extra:
        raise CheckpointError(f"{source}: carries parameters of method(s) {', '.join(extra)} (a patched run); "
                              f"start from the checkpoint it was patched from instead")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: its weights do not fit this run's backbone ({_first_line(err)}); "
                              f"use the same model and data settings as the run that wrote it") from None


def load_run_weights(model: nn.Module, weights: dict[str, torch.Tensor], frozen_backbone: bool,
                     source: str) -> None:
    """A run's own weights after its transforms are applied (step 4)."""
    try:
        if not frozen_backbone:
            model.load_state_dict(weights)
            return
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: its weights do not fit this run's model ({_first_line(err)}); "
                              f"use the same methods as the run that wrote it") from None
    lost = [k for k in missing if is_adapter_key(k)]
    if lost or unexpected:
        raise CheckpointError(f"{source}: method parameters do not match this run (missing {lost[:3]}, "
                              f"unexpected {list(unexpected)[:3]}); use the same methods as the run that wrote it")


def check_frozen_base(base_config: dict, cfg, source: str) -> None:
    """A run on a frozen backbone must train the network its base was trained as: the same
    diffusion process, model, and every transform the base used with the same settings (a DTR
    base stays routed). One line naming both values otherwise."""
    from trainers.config import load_config
    from trainers.configlib import to_dict
    from trainers.methods.registry import METHODS
    base = load_config(base_config)
    pairs = [("diffusion.schedule", base.diffusion.schedule, cfg.diffusion.schedule),
             ("diffusion.steps", base.diffusion.steps, cfg.diffusion.steps),
             ("diffusion.learn_sigma", base.diffusion.learn_sigma, cfg.diffusion.learn_sigma),
             ("model.name", base.model.name, cfg.model.name), ("model.arch", base.model.arch, cfg.model.arch)]
    for key, theirs, ours in pairs:
        if theirs != ours:
            raise CheckpointError(f"{key}: the base checkpoint ({source}) was trained with {theirs!r}, this run has "
                                  f"{ours!r}; a patch must match its base: set {key}={theirs}")
    for name, mcfg in base.methods.items():
        if "transform" in METHODS[name].slots(mcfg) and getattr(cfg.methods, name) != mcfg:
            raise CheckpointError(f"methods.{name}: the base checkpoint ({source}) was trained with {name} "
                                  f"{to_dict(mcfg)}, this run has {to_dict(getattr(cfg.methods, name))}; a patch "
                                  f"keeps the base's transforms: copy methods.{name} from the base config")


def freeze_backbone(model: nn.Module) -> int:
    """``requires_grad=False`` on every backbone parameter; returns how many were frozen."""
    n = 0
    for name, p in model.named_parameters():
        if not is_adapter_key(name):
            p.requires_grad_(False)
            n += p.numel()
    return n
