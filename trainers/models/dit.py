"""Diffusion Transformer with adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", §3.2). Every block takes the timestep ``t`` as an argument so that method
transforms (DTR masks, DMP gates) can act per sample without module state; transforms attach as
adapters (``trainers/models/contract.py``) and never rename the DiT's own modules. The network
never mentions ranks or devices.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.models.contract import BlockAdapter, Conditioning

__all__ = ["DiT", "DiTBlock", "DiTSpec", "DiTOptions", "SIZES", "timestep_embedding"]

# name -> (hidden, depth, heads). N and T are CPU-sized; S/B/L/XL as in the DiT paper, Table 1.
SIZES = {"N": (64, 4, 4), "T": (128, 6, 4), "S": (384, 12, 6), "B": (768, 12, 12),
         "L": (1024, 24, 16), "XL": (1152, 28, 16)}


@dataclass(frozen=True)
class DiTOptions:
    """``model.arch`` for the DiT family: overrides of the named size."""
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class DiTSpec:
    image_size: int
    channels: int
    patch: int
    hidden: int
    depth: int
    heads: int
    num_classes: int          # 0 = unconditional
    learn_sigma: bool
    mlp_ratio: float = 4.0

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                                     # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)   # [grid², dim]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])           # [N, H, L, d]
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class DiTBlock(nn.Module):
    """x + g_msa·Attn(mod(LN x)) + g_mlp·MLP(mod(LN ·)), modulation from the condition c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """ε_θ(x_t, t, y): [N, C, H, W] -> [N, C or 2C, H, W]. ``y`` uses index ``num_classes`` as null."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        self.spec = spec
        d, p = spec.hidden, spec.patch
        self.out_channels = spec.channels * (2 if spec.learn_sigma else 1)
        self.x_embedder = nn.Conv2d(spec.channels, d, kernel_size=p, stride=p)
        self.t_embedder = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Embedding(spec.num_classes + 1, d) if spec.num_classes > 0 else None
        grid = spec.image_size // p
        # torch.tensor (not from_numpy) so a `with torch.device(...)` context places it too
        self.register_buffer("pos_embed", torch.tensor(_sincos_pos_embed(d, grid), dtype=torch.float32)[None],
                             persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(d, spec.heads, spec.mlp_ratio) for _ in range(spec.depth)])
        self.final_layer = FinalLayer(d, p, self.out_channels)
        self.adapters = nn.ModuleDict()                    # method transforms (contract.py)
        self._init_weights()

    @property
    def width(self) -> int:
        return self.spec.hidden

    @property
    def num_tokens(self) -> int:
        return self.spec.num_tokens

    def add_adapter(self, name: str, adapter: BlockAdapter) -> None:
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already attached")
        self.adapters[name] = adapter

    def _init_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks:                         # adaLN-Zero: blocks start as identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> Conditioning:
        t_emb = self.t_embedder(timestep_embedding(t, 256))                     # [N, D]
        c = t_emb
        if self.y_embedder is not None:
            if y is None:
                y = torch.full_like(t, self.spec.num_classes, dtype=torch.long)
            c = c + self.y_embedder(y)
        return Conditioning(c, t, t_emb)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.embed(t, y).c

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        n, p, ch = x.shape[0], self.spec.patch, self.out_channels
        g = self.spec.image_size // p
        x = x.reshape(n, g, g, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, ch, g * p, g * p)

    def _run_block(self, index: int, h: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        call = functools.partial(self.blocks[index], c=cond.c, t=cond.t)
        for adapter in self.adapters.values():                                   # first registered: innermost
            call = functools.partial(adapter.forward_block, index, cond=cond, inner=call)
        return call(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed       # [N, L, D]
        cond = self.embed(t, y)
        adapters = list(self.adapters.values())
        for adapter in adapters:
            h = adapter.enter(h, cond)
        for index in range(len(self.blocks)):
            h = self._run_block(index, h, cond) if adapters else self.blocks[index](h, cond.c, t)
        for adapter in reversed(adapters):
            h = adapter.exit(h, cond)
        return self.unpatchify(self.final_layer(h, cond.c))                      # [N, C', H, W]
