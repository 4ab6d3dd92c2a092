"""Exponential moving average of the weights (Polyak averaging, as in DiT: decay 0.9999).

Parameters a plug-in declares ``ema=False`` (DMP's prompts and gate) are *followed*: their EMA
copy is the live value. Frozen parameters never change and are skipped. The update is one fused
``torch._foreach_lerp_`` over the averaged parameters.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["EMA"]


class EMA:
    def __init__(self, model: nn.Module, decay: float, follow: Iterable[str] = ()):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.follow = frozenset(follow)
        self._pairs: list = []

    def _bind(self, model: nn.Module) -> None:
        ema = dict(self.model.named_parameters())
        averaged, followed = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue                                   # frozen: identical in both copies
            (followed if name in self.follow else averaged).append((ema[name], p))
        buffers = list(zip(self.model.buffers(), model.buffers()))
        self._pairs = [averaged, followed, buffers]
        self._bound = model

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if getattr(self, "_bound", None) is not model:
            self._bind(model)
        averaged, followed, buffers = self._pairs
        if averaged:
            torch._foreach_lerp_([e for e, _ in averaged], [p.detach() for _, p in averaged], 1.0 - self.decay)
        for e, p in followed:
            e.copy_(p.detach())
        for eb, b in buffers:
            eb.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.model.load_state_dict(state, strict=strict)
