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
           "load_run_weights", "freeze_backbone"]

ADAPTER_PREFIX = "adapters."


def is_adapter_key(key: str) -> bool:
    return key.startswith(ADAPTER_PREFIX)


def backbone_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if not is_adapter_key(k)}


def adapter_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if is_adapter_key(k)}


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200]


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


def freeze_backbone(model: nn.Module) -> int:
    """``requires_grad=False`` on every backbone parameter; returns how many were frozen."""
    n = 0
    for name, p in model.named_parameters():
        if not is_adapter_key(name):
            p.requires_grad_(False)
            n += p.numel()
    return n
