"""DTR: Denoising Task Routing (Park et al., ICLR 2024, arXiv 2310.07138; docs/methods.md, "DTR").

Every DiT block reads a timestep-dependent channel subset of its input and writes all channels:

    u = m_t ⊙ x;  u = u + g·Attn(·u·);  u = u + g·MLP(·u·);  y = u + (1 − m_t) ⊙ x

i.e. ``y = Block(m_t ⊙ x) + (1 − m_t) ⊙ x``. The mask is gathered (never rebuilt) from a
precomputed ``[num_tasks, C]`` buffer indexed by the ORIGINAL timestep passed into the block, the
same mask in every block and none in the final layer. No parameters are added and no module of
the DiT is renamed (the router is an adapter, ``trainers/models/contract.py``), so DTR and vanilla
checkpoints are interchangeable; β = 1 reproduces the vanilla model exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn

from trainers.errors import ConfigError
from trainers.methods.protocols import BuildContext, Contribution, TransformBase
from trainers.methods.registry import MethodDescriptor, register
from trainers.methods.routing import random_routing_masks, routing_masks, routing_task_index
from trainers.models.contract import BlockAdapter, require_token_backbone

__all__ = ["DtrConfig", "DtrRouter", "DtrTransform", "DESCRIPTOR"]


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


class DtrRouter(BlockAdapter):
    """Routes every chosen block as ``Block(m_t ⊙ x) + (1 − m_t) ⊙ x``; holds only the mask buffer."""

    def __init__(self, masks: torch.Tensor, num_timesteps: int, blocks: tuple[int, ...]):
        super().__init__()
        self.register_buffer("masks", masks, persistent=False)          # [num_tasks, C]
        self.num_timesteps, self.blocks = num_timesteps, frozenset(blocks)

    def mask(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        task = routing_task_index(t, self.num_timesteps, self.masks.shape[0])
        return self.masks[task].to(dtype).unsqueeze(1)                    # [N, 1, C], gathered

    def forward_block(self, index, x, cond, inner):
        if index not in self.blocks:
            return inner(x)
        m = self.mask(cond.t, x.dtype)
        # Block(m ⊙ x) + (1 − m) ⊙ x, with the second term fused into one addcmul pass
        return torch.addcmul(inner(m * x), x, 1 - m)


class DtrTransform(TransformBase):
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
        require_token_backbone(model, "methods.dtr")
        depth = len(model.blocks)
        chosen = self.cfg.blocks if self.cfg.blocks is not None else tuple(range(depth))
        bad = [i for i in chosen if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"methods.dtr.blocks: indices {bad} out of range for a {depth}-block model")
        model.add_adapter("dtr", DtrRouter(self.masks(model.width, ctx.num_timesteps), ctx.num_timesteps,
                                           tuple(chosen)))
        return model



DESCRIPTOR = register(MethodDescriptor(
    name="dtr", config=DtrConfig, build=lambda cfg, ctx: Contribution(transforms=[DtrTransform(cfg)]),
    claims=lambda cfg: ("transform",), examples={"dtr": {"active_ratio": 0.5, "alpha": 1.0}},
    tested_with=(("ant-uw", "dtr"), ("ant-pcgrad", "dtr"), ("ant-nash", "dtr")),
    summary="timestep-dependent channel routing inside every block, no parameters (Park et al., ICLR 2024)"))
