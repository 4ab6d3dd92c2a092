"""Model registry: ``DiT-{N,T,S,B,L,XL}/{2,4,8}`` names -> built networks (a plain dict of sizes)."""
from __future__ import annotations

import re

from trainers.errors import ConfigError
from trainers.models.dit import SIZES, DiT, DiTSpec

__all__ = ["build_model", "model_spec", "check_model_name"]

_NAME = re.compile(r"^DiT-(N|T|S|B|L|XL)/(2|4|8)$")


def check_model_name(name: str) -> re.Match:
    match = _NAME.match(name)
    if not match:
        raise ConfigError(f"model.name: {name!r} is not a known model; use DiT-<size>/<patch> "
                          f"with size in {', '.join(SIZES)} and patch in 2, 4, 8 (e.g. DiT-T/2)")
    return match


def model_spec(cfg, *, image_size: int, channels: int, num_classes: int, learn_sigma: bool) -> DiTSpec:
    """Resolve a ``ModelConfig`` against the data's geometry."""
    match = check_model_name(cfg.name)
    hidden, depth, heads = SIZES[match.group(1)]
    hidden = cfg.hidden_size or hidden
    depth = cfg.depth or depth
    heads = cfg.num_heads or heads
    patch = int(match.group(2))
    if image_size % patch:
        raise ConfigError(f"model.name: patch {patch} does not divide the image size {image_size}; "
                          f"pick a smaller patch or resize the data")
    if hidden % heads or hidden % 4:
        raise ConfigError(f"model.hidden_size: {hidden} must be divisible by num_heads={heads} and by 4")
    return DiTSpec(image_size=image_size, channels=channels, patch=patch, hidden=hidden, depth=depth,
                   heads=heads, num_classes=num_classes, learn_sigma=learn_sigma)


def build_model(spec: DiTSpec) -> DiT:
    return DiT(spec)
