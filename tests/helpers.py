"""Shared test helpers: tiny configs, real digits, free ports, waiting.

Everything here builds real parts (real config loading, real DiT, real digits data); only the size
is small: DiT-N/2 on the 8x8 digits, 100 diffusion steps, batch 16.
"""
from __future__ import annotations

import copy
import functools
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainers.config import RunConfig, load_config
from trainers.data import ArrayDataset, StepBatches, load_digits

__all__ = ["free_port", "wait_for", "deep_merge", "tiny_dict", "tiny_config", "ray_run_dict", "digits", "init_for",
           "batches_for", "randomize_", "read_metrics", "methods_for", "T_TINY", "K_TINY"]

T_TINY = 100          # diffusion.steps in tiny configs
K_TINY = 4            # intervals.count in tiny configs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_dict(methods: Optional[dict] = None, **sections: Any) -> dict:
    """Raw config of an in-process tiny run (6 steps); ``sections`` are deep-merged on top."""
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


def ray_run_dict(**sections) -> dict:
    """Raw config of a seconds-scale Ray Train run on digits (20 steps, checkpoints every 10);
    each section given replaces keys of the default section (shallow per section)."""
    cfg = {"model": {"name": "DiT-N/2"}, "diffusion": {"steps": T_TINY}, "data": {"name": "digits"},
           "intervals": {"count": K_TINY}, "train": {"steps": 20, "batch_size": 16, "lr": 1e-3, "log_every": 5,
                                                     "checkpoint_every": 10},
           "sample": {"n": 4, "steps": 5}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


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


def methods_for(key: tuple[str, ...]) -> dict:
    """``methods:`` mapping for a combination key such as ``("ant-uw", "curriculum")``, built from
    each registered method's own example config."""
    from trainers.methods.registry import example_config
    out: dict = {}
    for variant in key:
        fragment = example_config(variant)
        if fragment is None:
            raise KeyError(f"no registered method has the variant {variant!r}")
        out = deep_merge(out, fragment)
    return out


def init_for(cfg: RunConfig) -> Optional[dict]:
    """A base checkpoint for a config whose methods train on a frozen backbone (DMP), else None:
    the same config without those methods, its weights randomised so the base is not trivial."""
    from trainers.build import build_context, resolve_run_intervals
    from trainers.loop import build_state, make_state
    from trainers.methods import METHODS, MethodsConfig
    from trainers.runtime import LocalRuntime
    intervals, _ = resolve_run_intervals(cfg)
    ctx = build_context(cfg, intervals, 1)
    keep = {name: m for name, m in cfg.methods.items() if not METHODS[name].build(m, ctx).freeze_backbone}
    if len(keep) == len(cfg.methods.enabled()):
        return None
    base_cfg = cfg.replace(methods=MethodsConfig(keep))
    state = build_state(base_cfg, LocalRuntime(), batches_for(base_cfg))
    randomize_(state.raw_model, seed=7)
    state.ema.model.load_state_dict(state.raw_model.state_dict())
    return make_state(state)


def run_cli(cli: list[str], *args: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` of a CLI command that, past `timeout`, fails the test with the command's
    own output (where it stopped) instead of hanging until pytest's timeout."""
    try:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        def tail(out) -> str:
            text = out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
            return text[-4000:]
        import pytest
        pytest.fail(f"`{' '.join(args)}` ran past {timeout:.0f} s; stdout:\n{tail(err.stdout)}\nstderr:\n{tail(err.stderr)}")
