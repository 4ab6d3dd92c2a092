"""The ``methods:`` section: one optional sub-config per *registered* method.

``methods: {dtr: {active_ratio: 0.8}, ant: {mtl: uw}}`` enables DTR and ANT; a method that is
absent (or ``null``, e.g. ``--set methods.dtr=null``) is off. Keys are the names in
``trainers.methods.registry.METHODS`` and each value is loaded strictly into that method's own
config dataclass, so a new method needs no edit here.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterator, Optional

from trainers.configlib import from_dict, to_dict
from trainers.errors import ConfigError

__all__ = ["MethodsConfig"]


def _registry() -> dict:
    import trainers.methods.builtin  # noqa: F401 - registers the built-in methods
    from trainers.methods.registry import METHODS
    return METHODS


class MethodsConfig:
    """Immutable mapping ``method name -> its config``; ``cfg.methods.ant`` is None when off."""

    __slots__ = ("_items",)

    def __init__(self, items: Optional[dict[str, Any]] = None):
        registry = _registry()
        items = dict(items or {})
        for name in items:
            if name not in registry:
                raise ConfigError(_unknown(name, registry))
        ordered = {name: items[name] for name in registry if items.get(name) is not None}
        object.__setattr__(self, "_items", ordered)

    @classmethod
    def from_config(cls, data: Any, path: str = "methods") -> "MethodsConfig":
        path = path or "methods"
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of method names to their settings, got {data!r}")
        registry = _registry()
        items = {}
        for name, value in data.items():
            if name not in registry:
                raise ConfigError(f"{path}.{_unknown(name, registry).partition('.')[2]}")
            if value is None:
                continue
            desc = registry[name]
            if not isinstance(value, (dict, desc.config)):
                raise ConfigError(f"{path}.{name}: expected a mapping of {desc.config.__name__} fields, got {value!r}")
            items[name] = value if isinstance(value, desc.config) else from_dict(desc.config, value, f"{path}.{name}")
        return cls(items)

    def to_config(self) -> dict[str, Any]:
        return {name: to_dict(value) for name, value in self._items.items()}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in _registry():
            return self._items.get(name)
        raise AttributeError(f"methods has no method {name!r}; registered: {', '.join(_registry())}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("MethodsConfig is immutable; build a new one")

    def enabled(self) -> list[str]:
        """Enabled method names, in registry order."""
        return list(self._items)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __reduce__(self):
        return (MethodsConfig, (dict(self._items),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodsConfig) and self._items == other._items

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"MethodsConfig({self._items!r})"


def _unknown(name: str, registry: dict) -> str:
    close = difflib.get_close_matches(str(name), list(registry), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"registered methods: {', '.join(registry)}"
    return f"methods.{name}: unknown key (not a registered method); {hint}"
