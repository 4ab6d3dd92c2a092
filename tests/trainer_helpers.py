"""Shared tiny-config helpers for the ``trainers/`` tests (tests/unit, tests/methods; CPU, seconds).

Everything here builds real parts (real config loading, real DiT, real digits data); the only
thing that is small is the size: DiT-N/2 on the 8x8 digits, 100 diffusion steps, batch 16.
"""
from __future__ import annotations

import copy
import functools
import json
import socket
from pathlib import Path
from typing import Any, Optional

import torch

from trainers.config import RunConfig, load_config
from trainers.data import ArrayDataset, StepBatches, load_digits

__all__ = ["tiny_config", "tiny_dict", "digits", "batches_for", "randomize_", "read_metrics",
           "METHOD_FRAGMENTS", "methods_for", "deep_merge", "free_port"]

T_TINY = 100          # diffusion.steps in tiny configs
K_TINY = 4            # intervals.count in tiny configs


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_dict(methods: Optional[dict] = None, **sections: Any) -> dict:
    """Raw config mapping of a tiny run; ``sections`` are deep-merged on top."""
    base = {
        "model": {"name": "DiT-N/2", "class_dropout": 0.1},
        "diffusion": {"schedule": "linear", "steps": T_TINY},
        "intervals": {"rule": "uniform", "count": K_TINY},
        "methods": methods or {},
        "train": {"steps": 6, "batch_size": 16, "lr": 1e-3, "log_every": 1, "checkpoint_every": 1000,
                  "ema_decay": 0.9, "seed": 0},
        "sample": {"n": 0, "steps": 4},
    }
    return deep_merge(base, sections)


def tiny_config(methods: Optional[dict] = None, **sections: Any) -> RunConfig:
    return load_config(tiny_dict(methods, **sections))


@functools.lru_cache(maxsize=1)
def _digits() -> ArrayDataset:
    return load_digits()


def digits() -> ArrayDataset:
    return _digits()


def batches_for(cfg: RunConfig, rank: int = 0, world_size: int = 1) -> StepBatches:
    return StepBatches(digits(), cfg.train.batch_size, rank=rank, world_size=world_size, seed=cfg.data.seed)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, in ``parameters()`` order.

    DiT's adaLN-Zero init makes every block an identity and the output exactly zero, which would
    make many comparisons vacuous; this gives every parameter a non-trivial value.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# One config fragment per method key of ``trainers.methods.compose.TESTED_COMBINATIONS``. Small
# patience / short fixed stages so the curriculum changes stage within a few steps; Nash refreshes
# its weights every 2 steps so resume lands between a refresh and a reuse.
METHOD_FRAGMENTS: dict[str, dict] = {
    "ant-uw": {"ant": {"mtl": "uw"}},
    "ant-pcgrad": {"ant": {"mtl": "pcgrad"}},
    "ant-nash": {"ant": {"mtl": "nash", "nash_every": 2}},
    "dtr": {"dtr": {"active_ratio": 0.5, "alpha": 1.0}},
    "curriculum": {"curriculum": {"clusters": 4, "pacing": "fixed", "stage_steps": 2}},
}


def methods_for(key: tuple[str, ...]) -> dict:
    """``methods:`` mapping for a combination key such as ``("ant-uw", "curriculum")``."""
    out: dict = {}
    for name in key:
        out = deep_merge(out, METHOD_FRAGMENTS[name])
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
