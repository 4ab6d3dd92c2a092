"""``denoiselab launch CLUSTER.yaml -- train CONFIG …``: a thin wrapper over Ray's cluster launcher.

Steps: ``ray up -y CLUSTER.yaml`` (start or update the cluster), ``ray dashboard CLUSTER.yaml``
(an SSH tunnel to the head's dashboard on 127.0.0.1:PORT; the dashboard is never exposed
publicly), ``denoiselab submit --address http://127.0.0.1:PORT -- …``, and with ``--down`` a
final ``ray down -y CLUSTER.yaml``. ``--dry-run`` prints every step and runs none. The Ray CLI
commands run with ``RAY_AUTH_MODE=token`` unless the mode is set.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from trainers.errors import UserError

__all__ = ["register", "plan_steps"]


def register(sub) -> None:
    p = sub.add_parser("launch", help="start a cluster from a launcher YAML (ray up) and submit a command to it")
    p.add_argument("cluster", help="cluster-launcher YAML, e.g. deploy/aws.yaml")
    p.add_argument("--port", type=int, default=8265, help="local end of the dashboard tunnel")
    p.add_argument("--down", action="store_true", help="tear the cluster down when the job ends")
    p.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    p.add_argument("command", nargs="+", help="-- train|search|experts … (what `denoiselab submit` runs)")
    p.set_defaults(handler=_cmd_launch)


def plan_steps(cluster: str, command: list[str], port: int, down: bool) -> list[list[str]]:
    from orchestrator.cli.jobs import entrypoint_for
    entrypoint_for(command)                                                # validates the command
    steps = [["ray", "up", "-y", cluster],
             ["ray", "dashboard", "--port", str(port), cluster],
             ["denoiselab", "submit", "--address", f"http://127.0.0.1:{port}", "--", *command]]
    if down:
        steps.append(["ray", "down", "-y", cluster])
    return steps


def _check_cluster_file(cluster: str) -> None:
    path = Path(cluster)
    if not path.is_file():
        raise UserError(f"launch: {cluster} is not a file; use a cluster-launcher YAML such as deploy/aws.yaml")
    import json
    import jsonschema
    import ray.autoscaler
    import yaml
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    except (jsonschema.ValidationError, yaml.YAMLError) as err:
        where = "/".join(map(str, getattr(err, "absolute_path", []))) or "top level"
        raise UserError(f"launch: {cluster} is not a valid Ray cluster config at {where}: "
                        f"{str(getattr(err, 'message', err)).splitlines()[0]}") from None


def _cmd_launch(args) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    _check_cluster_file(args.cluster)
    steps = plan_steps(args.cluster, command, args.port, args.down)
    if args.dry_run:
        for i, step in enumerate(steps, 1):
            suffix = "   (kept open in the background while the job runs)" if step[1] == "dashboard" else ""
            print(f"{i}. {shlex.join(step)}{suffix}")
        return 0
    env = {**os.environ}
    env.setdefault("RAY_AUTH_MODE", "token")
    up, tunnel, submit = steps[:3]
    if subprocess.call(up, env=env) != 0:
        raise UserError(f"launch: `{shlex.join(up)}` failed; its output is above")
    proxy = subprocess.Popen(tunnel, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)                                                      # let the SSH tunnel come up
        rc = subprocess.call([sys.executable, "-m", "orchestrator", *submit[1:]], env=env)
    finally:
        proxy.terminate()
        if args.down:
            subprocess.call(steps[3], env=env)
    return rc
