"""The Ray session of a denoiselab command: connect (or start a local instance) with the
environment every node needs.

* ``worker_env()``: endpoints and settings forwarded to every node through Ray's runtime
  environment. Never credentials: Ray writes the runtime environment, values included, to its
  log files (``runtime_env_agent.log``) and shows it in the dashboard. A local instance inherits
  this process's environment; cluster nodes get credentials from instance roles, the
  environment ``ray start`` ran in, or the Kubernetes secret in ``deploy/``.
* ``connect_ray(address)``: ``None`` starts a new local instance (never attaching to whatever a
  ``ray start`` left behind) with its dashboard on a known port, and points the State API at it, so
  Train V2's placement-group cleaner never guesses among several local Ray instances (it gives up,
  and the placement groups of stopped Tune trials leak; docs/platform.md).
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from orchestrator.infra.retry import first_line
from orchestrator.infra.storage import ENDPOINT_VARS
from trainers.errors import UserError

__all__ = ["worker_env", "connect_ray", "quiet_ray_console", "check_reachable", "detect_auth_mode", "in_ray_job", "durable_path"]

DEFAULT_PORTS = {"ray": 10001, "http": 8265, "https": 443, "": 6379}


def check_reachable(address: Optional[str], what: str = "--address", timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at a cluster address (a dead head
    would otherwise keep Ray retrying for minutes). ``auto``/``local``/``None`` are not probed."""
    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    scheme = "" if parsed.scheme == "tcp" else parsed.scheme
    host, port = parsed.hostname, parsed.port or DEFAULT_PORTS.get(scheme, 6379)
    if not host:
        raise UserError(f"{what}: {address!r} is not an address; use auto, host:6379, ray://host:10001 or "
                        f"http://host:8265")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"{what}: nothing answers at {host}:{port} ({reason}); start the cluster (`ray up "
                        f"deploy/aws.yaml`, `ray start --head`) or fix the address") from None


def detect_auth_mode() -> Optional[str]:
    """Ray >= 2.59 clusters have token authentication on, but clients do not follow on their own:
    with a token at hand (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) and no mode set, use it."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"]
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(os.path.expanduser("~/.ray/auth_token")):
        os.environ["RAY_AUTH_MODE"] = "token"
        return "token"
    return None


def in_ray_job() -> bool:
    """Running as a Ray job, in its temporary working directory (deleted with the session)."""
    return os.environ.get("DENOISELAB_IN_JOB") == "1" or "runtime_resources/working_dir_files" in os.getcwd()


def durable_path(path: str, what: str) -> str:
    """A local path made absolute. Inside a Ray job a relative path would land in the job's
    temporary working directory, so it goes under ``$DENOISELAB_HOME`` (default ~/denoiselab)
    instead, and the console says so."""
    if os.path.isabs(os.path.expanduser(path)) or not in_ray_job():
        return os.path.abspath(os.path.expanduser(path))
    home = Path(os.environ.get("DENOISELAB_HOME") or Path.home() / "denoiselab")
    target = str((home / path).resolve())
    print(f"denoiselab: {what}: {path} is relative inside a Ray job's temporary working directory; using {target} "
          f"(set an absolute path, s3:// or DENOISELAB_HOME to choose)", file=sys.stderr)
    return target


def worker_env() -> dict[str, str]:
    """Variables every node needs - endpoints and settings, no secrets (Ray logs these)."""
    names = ENDPOINT_VARS + ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "DENOISELAB_CACHE", "DENOISELAB_INCEPTION",
                               "DENOISELAB_EVAL_TIMEOUT_S", "RAY_API_SERVER_ADDRESS", "DENOISELAB_HOME",
                               "DENOISELAB_IN_JOB", "DENOISELAB_VERBOSE", "RAY_DATA_LOGGING_CONFIG")
    return {k: os.environ[k] for k in names if k in os.environ}


def quiet_ray_console() -> None:
    """Ray's console settings that are read when ``ray`` (or ``ray.data``) is imported, so must be
    set before: Ray Data's INFO lines to its log file only (unless --verbose), and no log
    deduplication (it would fold the trials' and workers' progress lines together). The CLI calls
    it first thing, ``connect_ray`` for programmatic callers."""
    if not os.environ.get("DENOISELAB_VERBOSE"):
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


EMBEDDED_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_enable_metrics_collection": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                     "REPORTER_UPDATE_INTERVAL_MS": "60000"}   # the dashboard's node stats: every minute, not 5 s


def connect_ray(address: Optional[str]) -> None:
    quiet_ray_console()
    import ray
    if ray.is_initialized():
        return
    env, local = worker_env(), {}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        port = _dashboard_port()
        local = {"address": "local", "dashboard_port": port}
        # the embedded one-node instance starts what a run needs: no node ever drains here (no
        # preemption-watcher actor per run), no usage report goes out, no metrics are collected
        # for a Prometheus nobody scrapes (Ray's core metrics, Train's per-report ones), and the
        # dashboard agent samples every process's stats once a minute instead of every 5 s (on
        # two cores all of it competes with training); each is the user's to set otherwise
        # through the same variable
        for var, value in EMBEDDED_DEFAULTS.items():
            os.environ.setdefault(var, value)
        env.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    else:
        check_reachable(address or os.environ.get("RAY_ADDRESS"),
                        "--address" if address else "RAY_ADDRESS")
        detect_auth_mode()
        # inside a Ray job the job's runtime env (working_dir, env_vars) merges with ours, not conflicts
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    try:
        ray.init(**{"address": address, **local}, runtime_env={"env_vars": env}, logging_level="ERROR",
                 configure_logging=True, log_to_driver=True)
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        first = first_line(err, 300)
        hint = ("; the cluster has token authentication on: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or copy "
                "the head's ~/.ray/auth_token)") if "auth" in first.lower() else ""
        raise UserError(f"{'--address' if address else 'ray'}: cannot connect to {address or 'Ray'}: {first}{hint}") from None


def disconnect_ray(timeout_s: float = 20.0) -> None:
    """Stop this process's Ray session now (an embedded instance stops with it), waiting at most
    `timeout_s`: after it, no worker's log line can reach the console, so the CLI's own last line
    stays last. A no-op when Ray was never started."""
    import threading
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    stopper = threading.Thread(target=ray.shutdown, name="denoiselab-ray-shutdown", daemon=True)
    stopper.start()
    stopper.join(timeout_s)


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
