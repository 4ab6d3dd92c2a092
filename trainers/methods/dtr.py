"""DTR: Denoising Task Routing (Park et al., ICLR 2024, arXiv 2310.07138; METHODS.md §2).

Every DiT block reads a timestep-dependent channel subset of its input and writes all channels:

    u = m_t ⊙ x;  u = u + g·Attn(·u·);  u = u + g·MLP(·u·);  y = u + (1 − m_t) ⊙ x     (§2.3)

i.e. ``y = Block(m_t ⊙ x) + (1 − m_t) ⊙ x``. The mask is gathered (never rebuilt) from a
precomputed ``[num_tasks, C]`` buffer indexed by the ORIGINAL timestep passed into the block, the
same mask in every block and none in the final layer. No parameters are added; β = 1 reproduces
the vanilla model exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn

from trainers.errors import ConfigError
from trainers.methods.protocols import BuildContext
from trainers.methods.routing import random_routing_masks, routing_masks, routing_task_index

__all__ = ["DtrConfig", "RoutedBlock", "DtrTransform"]


@dataclass(frozen=True)
class DtrConfig:
    active_ratio: float = 0.8          # β, paper default
    alpha: float = 4.0                 # α, paper default
    init: Literal["dtr", "random"] = "dtr"   # random = the R-TR control
    num_tasks: Optional[int] = None    # routing tasks; default = diffusion steps
    blocks: Optional[tuple[int, ...]] = None  # routed block indices; default = all
    seed: int = 0                      # random routing only

    def __post_init__(self) -> None:
        if not 0.0 < self.active_ratio <= 1.0:
            raise ConfigError("methods.dtr.active_ratio: must be in (0, 1]; the paper uses 0.8")
        if self.alpha <= 0:
            raise ConfigError("methods.dtr.alpha: must be > 0; the paper uses 4")


class RoutedBlock(nn.Module):
    """Wraps a block ``f(x, c, t)`` as ``f(m_t ⊙ x, c, t) + (1 − m_t) ⊙ x``."""

    def __init__(self, inner: nn.Module, masks: torch.Tensor, num_timesteps: int):
        super().__init__()
        self.inner = inner
        self.register_buffer("masks", masks, persistent=False)          # [num_tasks, C]
        self.num_timesteps = num_timesteps

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        task = routing_task_index(t, self.num_timesteps, self.masks.shape[0])
        m = self.masks[task].to(x.dtype).unsqueeze(1)                     # [N, 1, C], gathered
        # Block(m ⊙ x) + (1 − m) ⊙ x, with the second term fused into one addcmul pass
        return torch.addcmul(self.inner(m * x, c, t), x, 1 - m)


class DtrTransform:
    name = "dtr"

    def __init__(self, cfg: DtrConfig):
        self.cfg = cfg

    def masks(self, channels: int, num_timesteps: int) -> torch.Tensor:
        num_tasks = self.cfg.num_tasks or num_timesteps
        if num_tasks > num_timesteps:
            raise ConfigError(f"methods.dtr.num_tasks: {num_tasks} exceeds diffusion.steps={num_timesteps}")
        if self.cfg.init == "random":
            return random_routing_masks(num_tasks, channels, self.cfg.active_ratio, self.cfg.seed)
        return routing_masks(num_tasks, channels, self.cfg.active_ratio, self.cfg.alpha)

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        blocks = model.blocks
        chosen = self.cfg.blocks if self.cfg.blocks is not None else tuple(range(len(blocks)))
        bad = [i for i in chosen if not 0 <= i < len(blocks)]
        if bad:
            raise ConfigError(f"methods.dtr.blocks: indices {bad} out of range for a {len(blocks)}-block model")
        masks = self.masks(model.spec.hidden, ctx.num_timesteps)
        for i in chosen:
            blocks[i] = RoutedBlock(blocks[i], masks, ctx.num_timesteps)
        return model
