"""Strict typed loading of frozen dataclass configs from plain dicts, and dotted overrides.

A section whose keys come from a registry (``methods:``) is a class with ``from_config(value,
path)`` and ``to_config()``; everything else is a frozen dataclass.

One path for every source of configuration: a YAML file (parsed to a dict by the orchestrator),
``--set a.b=c`` on the CLI, and a Tune trial's overrides all go through :func:`apply_overrides`
and :func:`from_dict`. Unknown keys and wrong types raise :class:`ConfigError` naming the dotted
path and the fix (torchtitan ``configurable.py`` / nanoGPT ``configurator.py`` style).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from typing import Any, Literal, Union

from trainers.errors import ConfigError

__all__ = ["from_dict", "to_dict", "apply_overrides", "parse_value", "set_dotted", "flatten"]

_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the typed value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:        # Optional[X]: X's own message keeps the dotted path and the fix
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if isinstance(tp, type) and hasattr(tp, "from_config"):     # a registry-backed section
        return value if isinstance(value, tp) else tp.from_config(value, path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{path}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict | None, path: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys are errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{_join(path, key)}: unknown key{hint}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(path) or not path else f"{path}.{msg}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def to_dict(obj: Any) -> Any:
    """Plain-python (JSON/YAML/torch.save-safe) form of a config."""
    if hasattr(obj, "to_config"):
        return obj.to_config()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_value(text: str) -> Any:
    """Parse an override value: JSON (numbers, lists, objects), true/false/null, else a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("null", "none", "~"):
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def set_dotted(data: dict, dotted: str, value: Any) -> dict:
    """Return a copy of ``data`` with ``dotted`` (``a.b.c``) set to ``value``."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override {dotted!r}: empty key segment; write it as section.key=value")
    out = dict(data)
    node = out
    for key in keys[:-1]:
        child = node.get(key)
        child = dict(child) if isinstance(child, dict) else {}
        node[key] = child
        node = child
    node[keys[-1]] = value
    return out


def apply_overrides(data: dict, overrides: typing.Iterable[str] | dict) -> dict:
    """Apply ``["a.b=c", ...]`` (CLI) or ``{"a.b": value}`` (Tune) to a raw config dict."""
    items = overrides.items() if isinstance(overrides, dict) else None
    if items is None:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=200")
            key, _, text = item.partition("=")
            pairs.append((key.strip(), parse_value(text)))
        items = pairs
    for key, value in items:
        data = set_dotted(data, key, value)
    return data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, _join(prefix, key)))
        return out if out or not prefix else {prefix: "{}"}
    return {prefix: data}
