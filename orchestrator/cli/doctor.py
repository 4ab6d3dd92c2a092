"""``denoiselab doctor``: is everything a run needs in place? One line per check, exit 1 on any
failure. Checks: the environment a run needs (credentials for s3:// storage, a Ray token when
authentication is on), the cluster (reachable within seconds; nodes, CPUs, GPUs per node), the
versions of torch/ray/mlflow/denoiselab on every node against this machine's, storage writable
*from every node* (a Ray task on each node writes a marker and the driver reads it back), and the
tracking server (reachable, and accepting the configured credentials).
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["register", "run_checks", "Check"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<9} {self.detail}"


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check cluster, storage, tracking, environment and versions")
    p.add_argument("config", nargs="?", help="a run config whose storage and tracking to check")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", help="Ray cluster (default: start a local instance)")
    p.add_argument("--storage", help="storage path to check (default: the config's, else ./runs)")
    p.add_argument("--endpoint", help="S3-compatible endpoint for --storage")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, else $MLFLOW_TRACKING_URI)")
    p.set_defaults(handler=_cmd_doctor)


def _versions() -> dict[str, str]:
    from importlib import metadata
    out = {}
    for dist in ("denoiselab", "torch", "ray", "mlflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _node_probe(storage_uri: str, endpoint: Optional[str], marker: str) -> dict:
    """Runs on one node: its versions, GPUs, and a marker written to storage."""
    import socket
    import torch
    from orchestrator.infra.storage import open_storage
    result = {"host": socket.gethostname(), "versions": _versions(), "gpus": torch.cuda.device_count(), "error": None}
    try:
        open_storage(storage_uri, endpoint).write_bytes(result["host"].encode(), "_doctor", marker)
    except Exception as err:  # noqa: BLE001 - reported as a failed check
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return result


def _environment(storage: str, address: Optional[str]) -> Check:
    missing = []
    if storage.startswith("s3://"):
        import boto3
        if boto3.session.Session().get_credentials() is None:
            missing.append("AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an instance role)")
    if address and os.environ.get("RAY_AUTH_MODE") == "token" and not (
            os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(os.path.expanduser("~/.ray/auth_token"))):
        missing.append("RAY_AUTH_TOKEN (RAY_AUTH_MODE=token but no token)")
    if missing:
        return Check("env", False, "missing: " + "; ".join(missing) + " (see deploy/env.example)")
    return Check("env", True, "credentials and tokens a run needs are set")


def _tracking(uri: str) -> Check:
    import base64
    import json
    import urllib.error
    import urllib.request
    from orchestrator.infra.tracking import TrackingError, check_tracking
    try:
        check_tracking(uri)
    except TrackingError as err:
        return Check("tracking", False, str(err))
    if not uri.startswith(("http://", "https://")):
        return Check("tracking", True, f"{uri} (local store)")
    req = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                                 data=json.dumps({"max_results": 1}).encode(),
                                 headers={"Content-Type": "application/json"})
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5):
            pass
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            who = f"user {user!r}" if user else "no credentials"
            return Check("tracking", False, f"{uri} rejected {who} (HTTP {err.code}); set MLFLOW_TRACKING_USERNAME "
                                            f"and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        return Check("tracking", False, f"{uri} answered HTTP {err.code} to an API call")
    except OSError as err:
        return Check("tracking", False, f"{uri}: {err}")
    return Check("tracking", True, f"{uri} reachable and accepts {'user ' + repr(user) if user else 'the client'}")


def _cluster(address: Optional[str], storage: str, endpoint: Optional[str]) -> list[Check]:
    from orchestrator.infra.session import connect_ray
    from trainers.errors import UserError
    try:
        connect_ray(address)
    except UserError as err:
        return [Check("cluster", False, str(err))]
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    gpus = [int(n["Resources"].get("GPU", 0)) for n in nodes]
    checks = [Check("cluster", True, f"{address or 'local instance'}: {len(nodes)} node(s), {total.get('CPU', 0):g} CPU, "
                                     f"{total.get('GPU', 0):g} GPU (GPUs per node: {', '.join(map(str, gpus))})")]
    marker = f"{uuid.uuid4().hex}"
    probe = ray.remote(num_cpus=0)(_node_probe)
    futures = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(storage, endpoint, f"{marker}-{i}") for i, n in enumerate(nodes)]
    try:
        results = ray.get(futures, timeout=120)
    except Exception as err:  # noqa: BLE001
        return checks + [Check("nodes", False, f"a probe task failed: {str(err).splitlines()[0][:200]}")]
    mine = _versions()
    odd = [f"{r['host']}: {k} {v} (here {mine[k]})" for r in results for k, v in r["versions"].items() if v != mine[k]]
    checks.append(Check("versions", not odd, "; ".join(odd) if odd else
                        "same on every node: " + ", ".join(f"{k} {v}" for k, v in mine.items())))
    from orchestrator.infra.storage import open_storage
    store = open_storage(storage, endpoint)
    bad = [f"{r['host']}: {r['error']}" for r in results if r["error"]]
    for i, r in enumerate(results):
        if not r["error"]:
            try:
                if store.read_bytes("_doctor", f"{marker}-{i}").decode() != r["host"]:
                    bad.append(f"{r['host']}: marker read back differs")
                store.fs.delete_file(store.path("_doctor", f"{marker}-{i}"))
            except OSError as err:
                bad.append(f"{r['host']}: marker not readable from here ({err})")
    if len(nodes) > 1 and not store.is_remote:
        bad.append(f"{store.uri} is a local directory; a cluster of {len(nodes)} nodes needs s3:// storage")
    checks.append(Check("storage", not bad, "; ".join(bad) if bad else f"{store.uri} writable from all {len(nodes)} "
                                                                        f"node(s) and readable here"))
    return checks


def run_checks(address: Optional[str], storage: str, endpoint: Optional[str], tracking_uri: str,
               emit: Callable[[Check], None] = lambda c: print(c.line(), flush=True)) -> list[Check]:
    checks: list[Check] = []
    for step in (lambda: [_environment(storage, address)],
                 lambda: [Check("local", True, ", ".join(f"{k} {v}" for k, v in _versions().items()))],
                 lambda: [_tracking(tracking_uri)],
                 lambda: _cluster(address, storage, endpoint)):
        for check in step():
            emit(check)
            checks.append(check)
    return checks


def _cmd_doctor(args) -> int:
    from orchestrator.infra.tracking import resolve_tracking_uri
    storage, endpoint, tracking = args.storage, args.endpoint, args.tracking_uri
    if args.config:
        from orchestrator.infra.config_io import load_run_config
        cfg = load_run_config(args.config, args.overrides)
        storage = storage or cfg.storage.path
        endpoint = endpoint or cfg.storage.endpoint
        tracking = tracking or cfg.tracking.uri
    storage = storage or "./runs"
    if "://" not in storage:
        storage = os.path.abspath(storage)
    started = time.perf_counter()
    checks = run_checks(args.address, storage, endpoint, resolve_tracking_uri(tracking))
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 1 if failed else 0
