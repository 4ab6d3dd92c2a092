"""The method registry: one :class:`MethodDescriptor` per method, in a plain dict.

A method module defines its frozen config dataclass, a ``build(cfg, ctx) -> Contribution`` and
one descriptor, and registers it (the built-in methods are registered by
``trainers/methods/builtin.py``). ``compose()`` iterates :data:`METHODS`; the ``methods:``
config section accepts exactly the registered names; the interface tests run for every
descriptor's variants and tested combinations. Adding a method touches none of ``compose.py``,
``step.py`` or ``MethodsConfig`` (docs/architecture.md shows a worked example).

Slots a method may claim (docs/architecture.md, "slots"):

=============  ============  ==========================================================
slot           owners        what the contribution provides
=============  ============  ==========================================================
transform      ordered list  ``ModelTransform`` applied to the backbone at build time
sampler        one           ``TimestepSampler`` drawing ``(t, w)``
pacer          zero or one   ``Pacer`` narrowing what the sampler may draw
weighter       one           ``LossWeighter`` reducing per-interval losses to a scalar
combiner       one           ``GradientCombiner`` turning losses into ``.grad``
aux_loss       list          ``AuxLoss`` terms added to the scalar (e.g. DMP balancing)
=============  ============  ==========================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from trainers.errors import ConfigError

__all__ = ["SLOTS", "SINGLE_OWNER_SLOTS", "MethodDescriptor", "METHODS", "register", "unregister",
           "supported_combinations", "descriptor", "example_config"]

SLOTS = ("transform", "sampler", "pacer", "weighter", "combiner", "aux_loss")
SINGLE_OWNER_SLOTS = ("sampler", "pacer", "weighter", "combiner")


@dataclass(frozen=True)
class MethodDescriptor:
    """What the core knows about a method.

    * ``name``: its key under ``methods:``; ``config``: its frozen dataclass.
    * ``claims(cfg)``: the slots this configuration claims (a tuple of :data:`SLOTS`).
    * ``variant(cfg)``: the key used in combination lists, e.g. ``ant-uw`` (default: the name).
    * ``variants``: every variant key (the interface tests run each).
    * ``examples``: a small config per variant, for smoke and interface tests.
    * ``tested_with``: combinations (tuples of variant keys, this method's among them) covered by
      tests; ``compose()`` refuses any other combination of two or more methods.
    * ``build(cfg, ctx)``: returns the method's :class:`~trainers.methods.protocols.Contribution`.
    * ``refusal``: why an untested combination with this method is refused (the fix), optional.
    """
    name: str
    config: type
    build: Callable[[Any, Any], Any]
    claims: Callable[[Any], tuple[str, ...]]
    variant: Callable[[Any], str] = None          # type: ignore[assignment]
    variants: tuple[str, ...] = ()
    examples: dict[str, dict] = field(default_factory=dict)
    tested_with: tuple[tuple[str, ...], ...] = ()
    refusal: str = ""
    summary: str = ""

    def __post_init__(self) -> None:
        if self.variant is None:
            object.__setattr__(self, "variant", lambda cfg: self.name)
        if not self.variants:
            object.__setattr__(self, "variants", (self.name,))
        for combo in self.tested_with:
            if tuple(sorted(combo)) != tuple(combo):
                raise ValueError(f"{self.name}: tested combination {combo} must be sorted")

    def slots(self, cfg) -> tuple[str, ...]:
        claimed = tuple(self.claims(cfg))
        unknown = [s for s in claimed if s not in SLOTS]
        if unknown:
            raise ValueError(f"method {self.name} claims unknown slot(s) {unknown}; slots are {SLOTS}")
        return claimed


# name -> descriptor, in registration order (the order transforms are applied: inner first)
METHODS: dict[str, MethodDescriptor] = {}


def register(desc: MethodDescriptor) -> MethodDescriptor:
    if desc.name in METHODS and METHODS[desc.name] is not desc:
        raise ValueError(f"method {desc.name!r} is already registered")
    METHODS[desc.name] = desc
    return desc


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def descriptor(name: str) -> MethodDescriptor:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"methods.{name}: unknown method; registered: {', '.join(METHODS)}") from None


def supported_combinations() -> set[tuple[str, ...]]:
    """Every combination some registered method declares tested, plus each variant alone."""
    out: set[tuple[str, ...]] = {()}
    for desc in METHODS.values():
        out.update((v,) for v in desc.variants)
        out.update(tuple(c) for c in desc.tested_with
                   if all(any(v in d.variants for d in METHODS.values()) for v in c))
    return out


def example_config(variant: str) -> Optional[dict]:
    """``methods:`` mapping of one variant's example (None if no registered method has it)."""
    for desc in METHODS.values():
        if variant in desc.variants:
            return {desc.name: dict(desc.examples.get(variant, {}))}
    return None
