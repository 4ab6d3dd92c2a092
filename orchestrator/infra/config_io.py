"""YAML files <-> run configs (the only place a config file is parsed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from trainers.config import RunConfig, load_config
from trainers.errors import ConfigError

__all__ = ["read_yaml", "load_run_config", "dump_yaml"]


def read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found" if not p.exists() else f"{path}: not a file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (byte {err.start} is not UTF-8); give a YAML config") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = str(getattr(err, "problem", None) or err).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_run_config(path: Optional[str], overrides: Optional[list[str]] = None) -> RunConfig:
    data = read_yaml(path) if path else {}
    try:
        return load_config(data, overrides or [])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
