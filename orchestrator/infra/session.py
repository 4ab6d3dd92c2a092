"""The Ray session of a denoiselab command: connect (or start a local instance) with the
environment every node needs.

* ``worker_env()``: credentials and endpoints forwarded to every node through Ray's runtime
  environment (values are never logged).
* ``connect_ray(address)``: ``None`` starts a new local instance (never attaching to whatever a
  ``ray start`` left behind) with its dashboard on a known port, and points the State API at it, so
  Train V2's placement-group cleaner never guesses among several local Ray instances (it gives up,
  and the placement groups of stopped Tune trials leak; docs/platform.md).
"""
from __future__ import annotations

import os
from typing import Optional

from orchestrator.infra.storage import CREDENTIAL_VARS

__all__ = ["worker_env", "connect_ray"]


def worker_env() -> dict[str, str]:
    """Variables every node needs: credentials and endpoints (values never logged)."""
    names = CREDENTIAL_VARS + ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "DENOISELAB_CACHE", "DENOISELAB_INCEPTION",
                               "DENOISELAB_EVAL_TIMEOUT_S", "RAY_API_SERVER_ADDRESS")
    return {k: os.environ[k] for k in names if k in os.environ}


def connect_ray(address: Optional[str]) -> None:
    import ray
    if ray.is_initialized():
        return
    env, local = worker_env(), {}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        port = _dashboard_port()
        local = {"address": "local", "dashboard_port": port}
        env.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    ray.init(**{"address": address, **local}, runtime_env={"env_vars": env}, logging_level="ERROR",
             configure_logging=True, log_to_driver=True)


def _dashboard_port(preferred: int = 8265) -> int:
    """Ray's usual dashboard port when it is free, else any free port."""
    import socket
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    return preferred
