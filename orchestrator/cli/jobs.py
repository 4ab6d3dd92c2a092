"""``denoiselab submit`` and ``denoiselab jobs``: denoiselab commands as Ray jobs.

``submit --address http://HEAD:8265 -- train CONFIG …`` sends ``denoiselab train CONFIG …`` through
the Ray Jobs API with the working directory as the job's ``working_dir`` and the non-secret
variables a run needs (endpoints, tracking URI, region, denoiselab's own) in its runtime
environment. Credentials are not sent unless ``--forward-secrets`` is given: they would become
part of the job's record, readable by anyone with dashboard access; the cluster's nodes should
have them in their own environment (deploy/env.example, or the Kubernetes Secret). Token
authentication (Ray >= 2.59) is detected: a token in ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``
sets ``RAY_AUTH_MODE=token`` for the client unless the mode is set explicitly.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from orchestrator.infra.retry import Backoff, first_line, retry_call
from orchestrator.infra.storage import ENDPOINT_VARS, SECRET_VARS
from trainers.errors import UserError

__all__ = ["register", "job_env", "entrypoint_for", "submit_when_ready", "SUBMITTABLE"]

SUBMITTABLE = ("train", "search", "experts", "sample", "evaluate", "affinity", "data")
PLAIN_VARS = ("MLFLOW_TRACKING_URI", *ENDPOINT_VARS, "DENOISELAB_CACHE", "DENOISELAB_INCEPTION",
              "DENOISELAB_EVAL_TIMEOUT_S", "DENOISELAB_HOME")


def register(sub) -> None:
    s = sub.add_parser("submit", help="run a denoiselab command as a Ray job (Ray Jobs API)")
    s.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    s.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: .)")
    s.add_argument("--forward-secrets", action="store_true",
                   help="also send credentials in the job's runtime environment (visible to dashboard users)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.add_argument("--dry-run", action="store_true", help="print what would be submitted")
    s.add_argument("command", nargs="+", help="-- train|search|experts|sample|evaluate|affinity|data …")
    s.set_defaults(handler=_cmd_submit)
    j = sub.add_parser("jobs", help="list, follow or stop Ray jobs")
    j.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    jsub.add_parser("list", help="jobs on the cluster, newest first").set_defaults(handler=_cmd_list)
    logs = jsub.add_parser("logs", help="a job's output")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true")
    logs.set_defaults(handler=_cmd_logs)
    stop = jsub.add_parser("stop", help="stop a job")
    stop.add_argument("job_id")
    stop.set_defaults(handler=_cmd_stop)


def _address(explicit: Optional[str]) -> str:
    address = explicit or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: give the head's dashboard address, e.g. --address http://HEAD:8265 "
                        "(or set RAY_ADDRESS)")
    if "://" not in address:
        address = f"http://{address}"
    if address.startswith("ray://"):
        raise UserError(f"--address: {address} is a Ray Client address; jobs go to the dashboard, "
                        f"http://HEAD:8265")
    return address.rstrip("/")


def client_for(explicit: Optional[str]):
    """A ``JobSubmissionClient`` for the address, failing in seconds with one line."""
    from orchestrator.infra.session import check_reachable, detect_auth_mode
    address = _address(explicit)
    check_reachable(address, what="--address")
    detect_auth_mode()
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - connection and auth errors become one line
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        hint = ("; the head has token authentication on: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or copy "
                "the head's ~/.ray/auth_token)") if "auth" in first.lower() else ""
        raise UserError(f"--address: cannot use the Ray Jobs API at {address}: {first}{hint}") from None


def entrypoint_for(command: list[str]) -> str:
    import shlex
    if not command or command[0] not in SUBMITTABLE:
        raise UserError(f"submit: the command must start with one of {', '.join(SUBMITTABLE)} "
                        f"(got {command[0] if command else 'nothing'}); e.g. submit -- train CONFIG.yaml")
    return "denoiselab " + shlex.join(command)


def job_env(forward_secrets: bool) -> dict[str, str]:
    names = PLAIN_VARS + (tuple(v for v in SECRET_VARS if v != "RAY_AUTH_TOKEN") if forward_secrets else ())
    env = {k: os.environ[k] for k in names if os.environ.get(k)}
    env["DENOISELAB_IN_JOB"] = "1"
    return env


def _cmd_submit(args) -> int:
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
    entrypoint = entrypoint_for(command)
    working_dir = os.path.abspath(args.working_dir)
    if not os.path.isdir(working_dir):
        raise UserError(f"--working-dir: {args.working_dir} is not a directory")
    env = job_env(args.forward_secrets)
    runtime_env = {"working_dir": working_dir, "env_vars": env,
                   "excludes": [".venv", "runs", "mlflow.db", ".git", "__pycache__", "*.pt"]}
    if args.dry_run:
        print(f"would submit to {_address(args.address)}:\n  entrypoint   {entrypoint}\n  working_dir  {working_dir}\n"
              f"  env_vars     {', '.join(sorted(env)) or '-'}")
        return 0
    client = client_for(args.address)
    job_id = submit_when_ready(client, entrypoint, runtime_env)
    print(f"submitted job {job_id}: {entrypoint}", file=sys.stderr)
    print(job_id)
    if args.no_wait:
        return 0
    return _follow(client, job_id)


AGENT_NOT_READY = "No available agent to submit job"


class AgentNotReady(ConnectionError):
    """The head answers, but its job agent is still starting."""


def submit_when_ready(client, entrypoint: str, runtime_env: dict, backoff: Backoff = Backoff(90.0)) -> str:
    """Submit, waiting while the head's job agent is still starting: a head that `ray start` or
    `ray up` has just returned from answers "No available agent to submit job, please try again
    later" for a few seconds (longer on a busy machine). Any other refusal fails at once, in one
    line."""
    def submit() -> str:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if AGENT_NOT_READY in str(err):
                raise AgentNotReady(first_line(err, 300)) from None
            raise UserError(f"submit: the cluster refused the job: {first_line(err, 300)}") from None
    try:
        return retry_call(submit, backoff, "submit (the head's job agent is starting)", transient=(AgentNotReady,))
    except AgentNotReady as err:
        raise UserError(f"submit: the head's job agent was not ready after {backoff.budget:.0f} s ({err}); see "
                        f"dashboard_agent.log in the head's Ray session logs") from None


def _follow(client, job_id: str) -> int:
    import asyncio
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\ndenoiselab: stopped following; the job goes on (denoiselab jobs stop {job_id} to stop it)",
              file=sys.stderr)
        return 130
    for _ in range(50):
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.2)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _cmd_list(args) -> int:
    client = client_for(args.address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    print(f"{'job':<28} {'status':<10} entrypoint")
    for job in jobs:
        print(f"{(job.submission_id or job.job_id or '-'):<28} {str(job.status):<10} {job.entrypoint}")
    return 0


def _cmd_logs(args) -> int:
    client = client_for(args.address)
    if args.follow:
        return _follow(client, args.job_id)
    try:
        print(client.get_job_logs(args.job_id), end="")
    except RuntimeError as err:
        raise UserError(f"jobs logs: {args.job_id}: {str(err).splitlines()[0][:200]}") from None
    return 0


def _cmd_stop(args) -> int:
    client = client_for(args.address)
    stopped = client.stop_job(args.job_id)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
