"""U-Net experts for MEME: an ADM/LDM-style U-Net whose attention blocks can be inception mixers.

The U-Net (Ronneberger et al. 2015, as diffusion models use it: Ho et al. 2020; Dhariwal & Nichol
2021, ADM) has residual conv blocks with the timestep (+ class) embedding, down stages and up
stages with skip connections. At the stages listed in ``attention_stages`` each residual block is
followed by a token-mixing block:

* ``attention``: pre-norm multi-head self-attention over all positions (LDM / ADM);
* ``mixer``: the inception mixer of iFormer (Si et al., NeurIPS 2022), as MEME (Lee et al.,
  AAAI 2024, arXiv 2306.04990) uses it. The channels split into a high-frequency part ``d_h``
  and a low-frequency part ``d_l``:

      high (d_h, two halves):  max-pool 3×3 → linear    |    linear → depthwise conv 3×3
      low  (d_l):              average-pool ↓p → multi-head self-attention → upsample ↑p
      Y_c = concat(high₁, high₂, low);   Y = Linear(Y_c + DWConv(Y_c))

  ``high`` (per stage, in [0, 1]) is the fraction ``d_h / (d_h + d_l)``: 1 is all convolution,
  0 all attention. MEME makes it large for low-t experts and deep stages smaller (docs/methods.md).

The network is ``ε_θ(x_t, t, y)`` like the DiT, with ``y = num_classes`` as the null class. It has
no transformer blocks, so token transforms (DTR, DMP) refuse it. Tiny sizes (N, T) run on a CPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.errors import ConfigError
from trainers.models.dit import timestep_embedding
from trainers.models.registry import Geometry, ModelFamily, register_family

__all__ = ["UNetOptions", "UNetSpec", "UNet", "InceptionMixer", "UNET_SIZES"]

# name -> (base channels, channel multipliers per stage, residual blocks per stage, heads)
UNET_SIZES = {"N": (32, (1, 2), 1, 2), "T": (48, (1, 2, 2), 2, 4), "S": (128, (1, 2, 2, 4), 2, 4),
              "B": (192, (1, 2, 3, 4), 2, 6)}


@dataclass(frozen=True)
class UNetOptions:
    """``model.arch`` for the U-Net family."""
    base_channels: Optional[int] = None
    channel_mult: Optional[tuple[int, ...]] = None
    num_res_blocks: Optional[int] = None
    heads: Optional[int] = None
    block: Literal["mixer", "attention"] = "mixer"
    attention_stages: Optional[tuple[int, ...]] = None   # default: every stage but the first
    high: Optional[tuple[float, ...]] = None              # mixer d_h fraction per stage; default 0.5
    pool: int = 2                                         # mixer: low-frequency downsampling factor
    width_mult: float = 1.0                               # scales base_channels (searchable)
    depth_mult: float = 1.0                               # scales num_res_blocks (searchable)


@dataclass(frozen=True)
class UNetSpec:
    image_size: int
    channels: int
    num_classes: int
    learn_sigma: bool
    base: int
    mult: tuple[int, ...]
    res_blocks: int
    heads: int
    block: str
    attention_stages: tuple[int, ...]
    high: tuple[float, ...]
    pool: int


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _attend(x: torch.Tensor, qkv: nn.Conv2d, heads: int) -> torch.Tensor:
    """Multi-head self-attention over the H·W positions of x [N, C, H, W] -> [N, C, H, W]."""
    n, c, h, w = x.shape
    q, k, v = qkv(x).reshape(n, 3, heads, c // heads, h * w).permute(1, 0, 2, 4, 3)   # each [N, heads, HW, d]
    out = F.scaled_dot_product_attention(q, k, v)                                   # [N, heads, HW, d]
    return out.permute(0, 1, 3, 2).reshape(n, c, h, w)


class SelfAttention(nn.Module):
    """Pre-norm residual multi-head self-attention (the plain U-Net block)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(_attend(self.norm(x), self.qkv, self.heads))


def mixer_split(channels: int, high: float, heads: int) -> tuple[int, int, int]:
    """(d_h1, d_h2, d_l): the high part halved, the low part a multiple of ``heads`` (or 0)."""
    if not 0.0 <= high <= 1.0:
        raise ConfigError(f"model.arch.high: {high} is not a fraction in [0, 1] (1 = all conv, 0 = all attention)")
    d_low = channels - round(high * channels)
    d_low = (d_low // heads) * heads if d_low >= heads else (0 if high > 0 else heads)
    d_low = min(d_low, channels)
    d_high = channels - d_low
    return d_high // 2, d_high - d_high // 2, d_low


class InceptionMixer(nn.Module):
    """iFormer's inception token mixer on [N, C, H, W] (pre-norm residual), plus a conv MLP."""

    def __init__(self, channels: int, high: float, heads: int, pool: int):
        super().__init__()
        self.h1, self.h2, self.low = mixer_split(channels, high, heads)
        self.heads, self.pool = heads, pool
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.high_pool_linear = nn.Conv2d(self.h1, self.h1, 1) if self.h1 else None      # max-pool -> linear
        self.high_linear = nn.Conv2d(self.h2, self.h2, 1) if self.h2 else None           # linear -> dwconv
        self.high_dw = nn.Conv2d(self.h2, self.h2, 3, padding=1, groups=self.h2) if self.h2 else None
        self.low_qkv = nn.Conv2d(self.low, 3 * self.low, 1) if self.low else None        # pool -> MHSA -> up
        self.fuse_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.fuse = nn.Conv2d(channels, channels, 1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.GELU(), nn.Conv2d(2 * channels, channels, 1))
        for layer in (self.fuse, self.mlp[-1]):                       # residual branches start at zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        xh1, xh2, xl = torch.split(x, [self.h1, self.h2, self.low], dim=1)
        if self.h1:
            parts.append(self.high_pool_linear(F.max_pool2d(xh1, 3, stride=1, padding=1)))
        if self.h2:
            parts.append(self.high_dw(self.high_linear(xh2)))
        if self.low:
            size = x.shape[-2:]
            pooled = F.avg_pool2d(xl, self.pool) if self.pool > 1 and min(size) >= self.pool else xl
            attended = _attend(pooled, self.low_qkv, self.heads)
            parts.append(F.interpolate(attended, size=size, mode="nearest") if attended.shape[-2:] != size else attended)
        yc = torch.cat(parts, dim=1)                                                    # Y_c
        return self.fuse(yc + self.fuse_dw(yc))                                         # Linear(Y_c + DWConv(Y_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm(x))
        return x + self.mlp(self.norm2(x))


class _Step(nn.Module):
    """Layers applied in order; residual blocks also get the embedding."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """ε_θ(x_t, t, y): [N, C, H, W] -> [N, C or 2C, H, W]; ``y = num_classes`` is the null class."""

    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.spec = spec
        widths = [spec.base * m for m in spec.mult]
        emb = 4 * spec.base
        self.out_channels = spec.channels * (2 if spec.learn_sigma else 1)
        self.time_embed = nn.Sequential(nn.Linear(spec.base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_embed = nn.Embedding(spec.num_classes + 1, emb) if spec.num_classes > 0 else None
        self.stem = nn.Conv2d(spec.channels, spec.base, 3, padding=1)
        self.down, skips, cur = nn.ModuleList(), [spec.base], spec.base
        for s, width in enumerate(widths):
            for _ in range(spec.res_blocks):
                self.down.append(_Step(ResBlock(cur, width, emb), *self._mixing(s, width)))
                cur = width
                skips.append(cur)
            if s < len(widths) - 1:
                self.down.append(_Step(_Down(cur)))
                skips.append(cur)
        self.middle = _Step(ResBlock(cur, cur, emb), *self._mixing(len(widths) - 1, cur, force=True),
                            ResBlock(cur, cur, emb))
        self.up = nn.ModuleList()
        for s in reversed(range(len(widths))):
            for i in range(spec.res_blocks + 1):
                layers = [ResBlock(cur + skips.pop(), widths[s], emb), *self._mixing(s, widths[s])]
                cur = widths[s]
                if s > 0 and i == spec.res_blocks:
                    layers.append(_Up(cur))
                self.up.append(_Step(*layers))
        self.head = nn.Sequential(nn.GroupNorm(_groups(cur), cur), nn.SiLU(),
                                  nn.Conv2d(cur, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def _mixing(self, stage: int, width: int, force: bool = False) -> list[nn.Module]:
        spec = self.spec
        if not force and stage not in spec.attention_stages:
            return []
        heads = min(spec.heads, width)
        if spec.block == "attention":
            return [SelfAttention(width, heads)]
        return [InceptionMixer(width, spec.high[stage], heads, spec.pool)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.spec.base))                  # [N, E]
        if self.label_embed is not None:
            if y is None:
                y = torch.full_like(t, self.spec.num_classes, dtype=torch.long)
            emb = emb + self.label_embed(y)
        h = self.stem(x)
        skips = [h]
        for step in self.down:
            h = step(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for step in self.up:
            h = step(torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)                                                             # [N, C', H, W]


def _round_width(value: float) -> int:
    return max(8, int(round(value / 8.0)) * 8)


def _unet_spec(match: re.Match, opt: UNetOptions, geo: Geometry) -> UNetSpec:
    base, mult, res, heads = UNET_SIZES[match.group(1)]
    base = _round_width((opt.base_channels or base) * opt.width_mult)
    mult = tuple(opt.channel_mult or mult)
    res = max(1, int(round((opt.num_res_blocks or res) * opt.depth_mult)))
    heads = opt.heads or heads
    stages = len(mult)
    attention = tuple(opt.attention_stages) if opt.attention_stages is not None else tuple(range(1, stages))
    high = tuple(opt.high) if opt.high is not None else (0.5,) * stages
    if len(high) != stages:
        raise ConfigError(f"model.arch.high: {len(high)} fractions for {stages} stages; give one per stage "
                          f"(channel_mult {mult})")
    if any(not 0 <= s < stages for s in attention):
        raise ConfigError(f"model.arch.attention_stages: {attention} outside 0..{stages - 1}")
    if geo.image_size % 2 ** (stages - 1):
        raise ConfigError(f"model.name: a {stages}-stage U-Net halves the image {stages - 1} times, which "
                          f"{geo.image_size} px does not allow; use fewer stages (model.arch.channel_mult)")
    for h in high:
        mixer_split(base, h, 1)                                   # range check of every fraction
    return UNetSpec(image_size=geo.image_size, channels=geo.channels, num_classes=geo.num_classes,
                    learn_sigma=geo.learn_sigma, base=base, mult=mult, res_blocks=res, heads=heads, block=opt.block,
                    attention_stages=attention, high=high, pool=opt.pool)


register_family(ModelFamily(
    name="UNet", pattern=re.compile(r"^UNet-(N|T|S|B)$"),
    usage=f"UNet-<size> with size in {', '.join(UNET_SIZES)}",
    options=UNetOptions, resolve=_unet_spec, build=UNet, spec_type=UNetSpec,
    stages=lambda match, opt: len(opt.channel_mult or UNET_SIZES[match.group(1)][1])))
