"""denoiselab's pure-PyTorch core: models, diffusion, the five training methods as slot plug-ins,
the training step and loop, checkpoints and evaluation math.

Imports only torch, numpy and the standard library (never ray, mlflow, boto3, pyarrow, optuna);
``tests/unit/test_layering.py`` enforces it. ``import trainers`` itself is cheap: the names below
are loaded from their submodules on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from trainers.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, UserError

__all__ = ["UserError", "ConfigError", "DataError", "CheckpointError", "TrainingDiverged",
           "RunConfig", "load_config", "run_name_for", "train", "LocalRuntime", "DistRuntime",
           "LocalReporter", "load_state", "save_state"]

_LAZY = {
    "RunConfig": "trainers.config", "load_config": "trainers.config", "run_name_for": "trainers.config",
    "train": "trainers.loop", "LocalRuntime": "trainers.runtime", "DistRuntime": "trainers.runtime",
    "LocalReporter": "trainers.reporting", "load_state": "trainers.checkpoint", "save_state": "trainers.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
