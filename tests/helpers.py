"""Shared test helpers: tiny configs, free ports, waiting."""
from __future__ import annotations

import socket
import time
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def tiny_config(**sections) -> dict:
    """A seconds-scale run on digits: DiT-N/2, T=100 steps of diffusion, batch 16."""
    cfg = {"model": {"name": "DiT-N/2"}, "diffusion": {"steps": 100}, "data": {"name": "digits"},
           "intervals": {"count": 4}, "train": {"steps": 20, "batch_size": 16, "lr": 1e-3, "log_every": 5,
                                                 "checkpoint_every": 10},
           "sample": {"n": 4, "steps": 5}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg
