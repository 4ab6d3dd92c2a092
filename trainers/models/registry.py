"""Model registry by family: a plain dict ``family -> ModelFamily`` (spec type, name pattern,
options, constructor).

``model.name`` picks the family by its pattern (``DiT-B/2`` is the DiT family, size B, patch 2);
``model.arch`` holds family-specific overrides, validated by the family's options dataclass.
A resolved spec is stored in checkpoints as a plain dict with its ``family``, so any checkpoint
rebuilds with the code path that trained it. A new family (MEME's U-Nets) is one module plus one
``register_family`` call.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch.nn as nn

from trainers.configlib import from_dict
from trainers.errors import ConfigError
from trainers.models.dit import SIZES, DiT, DiTOptions, DiTSpec

__all__ = ["Geometry", "ModelFamily", "FAMILIES", "register_family", "family_of", "block_count", "stage_count", "model_options",
           "model_spec", "build_model", "spec_to_dict", "spec_from_dict", "known_models"]


@dataclass(frozen=True)
class Geometry:
    image_size: int
    channels: int
    num_classes: int
    learn_sigma: bool


@dataclass(frozen=True)
class ModelFamily:
    name: str
    pattern: re.Pattern
    usage: str                                      # how names of this family are written
    options: type                                   # dataclass for model.arch
    resolve: Callable[[re.Match, Any, Geometry], Any]   # (name match, options, geometry) -> spec
    build: Callable[[Any], nn.Module]
    spec_type: type
    depth: Optional[Callable[[re.Match, Any], int]] = None   # blocks of a token backbone, if it has them
    stages: Optional[Callable[[re.Match, Any], int]] = None  # resolution stages with mixers (U-Nets)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def known_models() -> str:
    return "; ".join(f.usage for f in FAMILIES.values())


def family_of(name: str) -> tuple[ModelFamily, re.Match]:
    for family in FAMILIES.values():
        match = family.pattern.match(name)
        if match:
            return family, match
    raise ConfigError(f"model.name: {name!r} is not a known model; use {known_models()} (e.g. DiT-T/2)")


def block_count(model_cfg) -> Optional[int]:
    """Number of transformer blocks the model config builds (None for families without them)."""
    family, match = family_of(model_cfg.name)
    return None if family.depth is None else family.depth(match, model_options(model_cfg.name, model_cfg.arch))


def stage_count(name: str, arch: dict) -> Optional[int]:
    """Resolution stages of a model whose blocks mix per stage (the U-Net family), else None."""
    family, match = family_of(name)
    return None if family.stages is None else family.stages(match, model_options(name, arch))


def model_options(name: str, arch: dict) -> Any:
    """``model.arch`` loaded strictly into the family's options dataclass."""
    family, _ = family_of(name)
    return from_dict(family.options, dict(arch or {}), "model.arch")


def model_spec(cfg, *, image_size: int, channels: int, num_classes: int, learn_sigma: bool) -> Any:
    """Resolve a ``ModelConfig`` against the data's geometry into the family's spec."""
    family, match = family_of(cfg.name)
    return family.resolve(match, model_options(cfg.name, cfg.arch), Geometry(image_size, channels, num_classes,
                                                                             learn_sigma))


def spec_to_dict(spec: Any) -> dict:
    for family in FAMILIES.values():
        if isinstance(spec, family.spec_type):
            return {"family": family.name, **asdict(spec)}
    raise ValueError(f"no registered family builds a {type(spec).__name__}")


def spec_from_dict(data: dict) -> Any:
    data = dict(data)
    family = FAMILIES[data.pop("family", "DiT")]              # checkpoints before families were DiT
    return family.spec_type(**data)


def build_model(spec: Any) -> nn.Module:
    if isinstance(spec, dict):
        spec = spec_from_dict(spec)
    for family in FAMILIES.values():
        if isinstance(spec, family.spec_type):
            return family.build(spec)
    raise ValueError(f"no registered family builds a {type(spec).__name__}")


# ------------------------------------------------------------------------------------- DiT
def _dit_spec(match: re.Match, opt: DiTOptions, geo: Geometry) -> DiTSpec:
    hidden, depth, heads = SIZES[match.group(1)]
    hidden = opt.hidden_size or hidden
    depth = opt.depth or depth
    heads = opt.num_heads or heads
    patch = int(match.group(2))
    if geo.image_size % patch:
        raise ConfigError(f"model.name: patch {patch} does not divide the image size {geo.image_size}; "
                          f"pick a smaller patch or resize the data")
    if hidden % heads or hidden % 4:
        raise ConfigError(f"model.arch.hidden_size: {hidden} must be divisible by num_heads={heads} and by 4")
    return DiTSpec(image_size=geo.image_size, channels=geo.channels, patch=patch, hidden=hidden, depth=depth,
                   heads=heads, num_classes=geo.num_classes, learn_sigma=geo.learn_sigma, mlp_ratio=opt.mlp_ratio)


register_family(ModelFamily(
    name="DiT", pattern=re.compile(r"^DiT-(N|T|S|B|L|XL)/(2|4|8)$"),
    usage=f"DiT-<size>/<patch> with size in {', '.join(SIZES)} and patch in 2, 4, 8",
    options=DiTOptions, resolve=_dit_spec, build=DiT, spec_type=DiTSpec,
    depth=lambda match, opt: opt.depth or SIZES[match.group(1)][1]))

from trainers.models import unet as _unet  # noqa: E402,F401 - registers the U-Net family (MEME experts)
