"""The small contract a model transform may rely on (docs/architecture.md, "model families").

A *token backbone* (the DiT family) is a network whose body is a list of blocks, each called as
``block(x [N, L, D], c [N, D], t [N]) -> [N, L, D]`` with the conditioning vector ``c`` and the
ORIGINAL timestep ``t`` as arguments. It exposes:

* ``blocks`` (an ``nn.ModuleList``), ``width`` (D) and ``num_tokens`` (L);
* ``embed(t, y) -> Conditioning`` (``c``, ``t`` and the timestep embedding alone);
* ``add_adapter(name, adapter)``: a :class:`BlockAdapter` registered under ``adapters.<name>``.

Adapter hooks receive the :class:`Conditioning` of the forward pass.

Transforms never replace or rename the backbone's modules: what they add lives in adapters, so a
checkpoint's backbone keys are the same with and without a transform (a vanilla checkpoint starts
a DTR run and the other way round) and base weights load before any transform is applied.
Adapters nest in registration order: the first registered runs innermost, next to the block.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch
import torch.nn as nn

from trainers.errors import ConfigError

__all__ = ["Conditioning", "BlockAdapter", "TokenBackbone", "is_token_backbone", "require_token_backbone"]


class Conditioning(NamedTuple):
    """What conditions one forward pass."""
    c: torch.Tensor          # [N, D] conditioning vector: timestep embedding (+ class embedding)
    t: torch.Tensor          # [N] original timesteps (never respaced indices)
    t_emb: torch.Tensor      # [N, D] the timestep embedding alone


class BlockAdapter(nn.Module):
    """Acts around a token backbone's blocks; every hook is the identity unless overridden."""

    def enter(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Before the first block (e.g. prepend tokens)."""
        return x

    def forward_block(self, index: int, x: torch.Tensor, cond: Conditioning,
                      inner: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Around block ``index``; ``inner(x)`` runs the block (and the adapters inside this one)."""
        return inner(x)

    def exit(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """After the last block, before the output layer (e.g. drop prepended tokens)."""
        return x


class TokenBackbone(Protocol):
    blocks: nn.ModuleList
    adapters: nn.ModuleDict

    @property
    def width(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> Conditioning: ...
    def add_adapter(self, name: str, adapter: BlockAdapter) -> None: ...


def is_token_backbone(model: nn.Module) -> bool:
    """Does ``model`` have what :class:`TokenBackbone` names? Checked by plain attribute lookup:
    from Python 3.12 ``isinstance`` against a runtime-checkable protocol looks attributes up
    statically, which misses an ``nn.Module``'s submodules (they live in ``_modules``), so every
    DiT was refused there."""
    return all(hasattr(model, name) for name in ("blocks", "adapters", "width", "num_tokens", "embed",
                                                 "add_adapter"))


def require_token_backbone(model: nn.Module, what: str) -> None:
    """Refuse a transform on a model that does not have transformer blocks."""
    if not is_token_backbone(model):
        family = getattr(getattr(model, "spec", None), "__class__", type(model)).__name__
        raise ConfigError(f"{what}: needs a model with transformer blocks (the DiT family); "
                          f"this model ({family}) has none - use model.name=DiT-<size>/<patch>")
