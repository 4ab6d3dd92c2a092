"""Operating a cluster as a user does: dead addresses fail in seconds, `submit`/`jobs` against a
real `ray start --head` with token authentication, `doctor` against real services, an `mlflow
server` with basic authentication, Ctrl-C on a run, the quiet console and the CLI's own flags."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for
from tests.integration.conftest import running_mlflow_server

CLI = [sys.executable, "-m", "orchestrator"]
RAY = str(Path(sys.executable).with_name("ray"))
TINY = ("name: {name}\nmodel: {{name: DiT-N/2}}\ndiffusion: {{steps: 100}}\n"
        "train: {{steps: {steps}, batch_size: 16, checkpoint_every: {every}, log_every: 5}}\n"
        "sample: {{n: {n}, steps: 5}}\nscaling: {{num_workers: 1, cpus_per_worker: 1}}\n"
        "storage: {{path: {storage}}}\n")


def _cli(*args: str, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_version_and_debug_after_the_command(tmp_path):
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("denoiselab 0.")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stepz: 3}\n")
    plain = _cli("train", str(bad))
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1
    debug = _cli("train", str(bad), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("command", [
    ["train", "{cfg}"], ["search", "search/studies/smoke.yaml"], ["experts", "orchestrator/experiments/meme_digits.yaml"],
    ["sample", "some-run", "--n", "100", "--workers", "2"], ["affinity", "some-run", "--out", "{tmp}/aff"],
    ["doctor"]])
def test_dead_address_fails_in_seconds(command, tmp_path):
    port = free_port()                                                    # nothing listens there
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(name="dead", steps=5, every=5, n=0, storage=tmp_path / "runs"))
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in command] + ["--address", f"127.0.0.1:{port}"]
    started = time.monotonic()
    out = _cli(*args, cwd=Path(__file__).resolve().parents[2], timeout=120)
    seconds = time.monotonic() - started
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"nothing answers at 127.0.0.1:{port}" in lines[-1] and "start the cluster" in lines[-1]
    assert seconds < 30


@pytest.fixture(scope="module")
def head(s3, tmp_path_factory):
    """A real `ray start --head` on this host, token authentication on (Ray's default since
    2.59), its token in a private HOME; jobs keep relative paths under DENOISELAB_HOME. The node's
    environment holds the storage credentials (the s3 fixture's), as a cluster node's would:
    denoiselab never sends credentials through Ray."""
    home = tmp_path_factory.mktemp("head-home")
    # every port its own: another Ray instance on this host (the other test process's, a developer's)
    # holds Ray's default dashboard-agent port 52365, and a head whose agent cannot bind it takes no jobs
    # ("No available agent to submit job")
    ports = {"gcs": free_port(), "dashboard": free_port(), "client": free_port(), "agent": free_port()}
    # the head's processes point the State API at its own dashboard (as connect_ray does for a local
    # instance), so Train V2's placement-group cleaner never picks another Ray instance on this host
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "DENOISELAB_HOME": str(home / "durable"),
           "RAY_DEDUP_LOGS": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports['dashboard']}"}
    env.pop("RAY_ADDRESS", None)
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(generate_new_authentication_token())
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
                            "--dashboard-port", str(ports["dashboard"]), "--ray-client-server-port",
                            str(ports["client"]), "--dashboard-agent-listen-port", str(ports["agent"]),
                            "--num-cpus", "2", "--disable-usage-stats",
                            "--dashboard-host", "127.0.0.1"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield {"env": env, "home": home, "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
               "gcs": f"127.0.0.1:{ports['gcs']}"}
    finally:
        _stop_head(ports["gcs"])


def _stop_head(gcs_port: int) -> None:
    """Stop this head's processes only (`ray stop` would stop every Ray instance on the machine,
    a developer's own jobs included): those naming its GCS port, then every process of its
    session directory (dashboard, agents, workers)."""
    import psutil
    procs = list(psutil.process_iter(["pid", "cmdline"]))
    mine = [p for p in procs if f":{gcs_port}" in " ".join(p.info["cmdline"] or []) or
            f"--gcs_server_port={gcs_port}" in " ".join(p.info["cmdline"] or [])]
    sessions = {arg.split("/sockets/")[0].split("/logs")[0].split("=", 1)[-1] for p in mine
                for arg in (p.info["cmdline"] or []) if "/session_" in arg}
    for proc in procs:
        line = " ".join(proc.info["cmdline"] or [])
        if proc in mine or any(session and session in line for session in sessions):
            try:
                proc.kill()
            except psutil.Error:
                pass
    # `ray start` recorded this head as the machine's current cluster, and a later `ray.init()`
    # without an address would try to join it, dead (`ray stop` removes the record too)
    from ray._private.utils import get_ray_address_file, read_ray_address
    if (read_ray_address() or "").endswith(f":{gcs_port}"):
        os.remove(get_ray_address_file(None))


@pytest.mark.ray
@pytest.mark.slow
def test_submit_jobs_and_relative_paths_survive(head, tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    (work / "c.yaml").write_text(TINY.format(name="job-run", steps=10, every=5, n=0, storage="./runs"))
    env = {k: v for k, v in head["env"].items() if k != "RAY_AUTH_MODE"}   # the client detects token auth
    client_env = {**env, "HOME": str(head["home"])}
    sub = subprocess.run([*CLI, "submit", "--address", head["dashboard"], "--", "train", "c.yaml"], cwd=work,
                         env=client_env, capture_output=True, text=True, timeout=400)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    job_id = sub.stdout.strip().splitlines()[-1] if "raysubmit_" in sub.stdout.splitlines()[-1] else \
        next(line for line in sub.stdout.splitlines() if line.startswith("raysubmit_"))
    durable = head["home"] / "durable" / "runs" / "job-run"
    assert (durable / "step_00000010" / "state.pt").exists()               # kept outside the job's temp dir
    assert "storage.path: ./runs is relative inside a Ray job" in sub.stdout + sub.stderr
    logs = subprocess.run([*CLI, "jobs", "--address", head["dashboard"], "logs", job_id], env=client_env,
                          capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "step 10/10" in logs.stdout
    listed = subprocess.run([*CLI, "jobs", "--address", head["dashboard"], "list"], env=client_env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    dry = subprocess.run([*CLI, "launch", "deploy/aws.yaml", "--dry-run", "--down", "--", "train", "c.yaml"],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert [line.split(" ", 1)[1].split("   ")[0] for line in dry.stdout.strip().splitlines()] == [
        "ray up -y deploy/aws.yaml", "ray dashboard --port 8265 deploy/aws.yaml",
        "denoiselab submit --address http://127.0.0.1:8265 -- train c.yaml", "ray down -y deploy/aws.yaml"]


@pytest.fixture(scope="module")
def auth_mlflow(tmp_path_factory):
    """`mlflow server --app-name basic-auth` with an admin user from its auth config."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/auth.db\n"
                                   "admin_username = admin\nadmin_password = doctor-test-pass-123\n"
                                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret"}
    with running_mlflow_server(root, "--app-name", "basic-auth", env=env) as uri:
        yield uri


@pytest.mark.ray
@pytest.mark.slow
def test_doctor_passes_and_fails_clearly(head, s3, auth_mlflow, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(key, None)
    with pytest.raises(MlflowException):                                  # unauthenticated: rejected
        MlflowClient(auth_mlflow).create_experiment("nope")
    user = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "doctor-test-pass-123"}
    head_vars = {k: head["env"][k] for k in ("HOME", "RAY_AUTH_MODE", "DENOISELAB_HOME", "PATH")}
    env = {**os.environ, **head_vars, **user}                             # with the s3 fixture's credentials
    ok = subprocess.run([*CLI, "doctor", "--address", head["gcs"], "--storage", "s3://denoiselab/doctor",
                         "--endpoint", s3["endpoint"], "--tracking-uri", auth_mlflow], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    names = [line.split()[1] for line in ok.stdout.strip().splitlines()]
    assert names == ["env", "local", "tracking", "cluster", "versions", "storage"]
    assert "writable from all 1 node(s)" in ok.stdout and "accepts user 'admin'" in ok.stdout
    os.environ.update(user)                                               # the standard variables work
    try:
        assert MlflowClient(auth_mlflow).create_experiment("doctor-ok")
    finally:
        for key in user:
            os.environ.pop(key, None)
    anonymous = {k: v for k, v in env.items() if k not in user}
    no_user = subprocess.run([*CLI, "doctor", "--address", head["gcs"], "--storage", str(tmp_path / "runs"),
                              "--tracking-uri", auth_mlflow], env=anonymous, capture_output=True, text=True,
                             timeout=300)
    assert no_user.returncode == 1 and "FAIL  tracking  " in no_user.stdout and "HTTP 401" in no_user.stdout
    dead = f"http://127.0.0.1:{free_port()}"
    bad = subprocess.run([*CLI, "doctor", "--address", head["gcs"], "--storage", "s3://denoiselab/doctor",
                          "--endpoint", dead, "--tracking-uri", dead], env=env, capture_output=True, text=True,
                         timeout=300)
    fails = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    assert bad.returncode == 1 and len(fails) == 2
    assert "FAIL  tracking  " in fails[0] and "cannot reach the MLflow server" in fails[0]
    assert "FAIL  storage   " in fails[1]


def test_missing_tracking_credentials_are_one_line_before_ray_starts(auth_mlflow, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(name="no-creds", steps=5, every=5, n=0, storage=tmp_path / "runs"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    for extra in ({}, {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"}):
        out = subprocess.run([*CLI, "train", str(cfg), "--set", f"tracking.uri={auth_mlflow}"], cwd=tmp_path,
                             env={**env, **extra}, capture_output=True, text=True, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
        assert "refused the request (HTTP 401)" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0]
    assert not (tmp_path / "runs" / "no-creds").exists(), "nothing is written for a run that cannot be tracked"


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(name="interrupted", steps=4000, every=5, n=0, storage=tmp_path / "runs"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    with open(tmp_path / "out.txt", "w") as out_f, open(tmp_path / "err.txt", "w") as err_f:
        proc = subprocess.Popen([*CLI, "train", str(cfg)], cwd=tmp_path, env=env, stdout=out_f, stderr=err_f,
                                text=True, start_new_session=True)
        try:
            wait_for(lambda: (tmp_path / "runs" / "interrupted" / "step_00000005").exists() or proc.poll() is not None,
                     240, 0.5, "a checkpoint")
            os.killpg(proc.pid, signal.SIGINT)                             # what a terminal sends
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; re-run the same command to resume" in err.strip().splitlines()[-1]
    assert "Reporting training result" not in out + err and "TrainingReport(" not in out + err   # quiet console
    from mlflow.tracking import MlflowClient
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("denoiselab").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_summary_prints_only_what_exists(tmp_path):
    from orchestrator.cli.train import _print_summary
    from orchestrator.runs.driver import TrainOutcome
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    outcome = TrainOutcome("r", "abc", "sqlite:///x.db", None, False, str(run_dir), {"loss": 0.5})
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _print_summary(outcome)
    assert "samples" not in buf.getvalue() and "checkpoint" not in buf.getvalue()
    (run_dir / "denoiselab" / "artifacts" / "samples").mkdir(parents=True)
    (run_dir / "denoiselab" / "artifacts" / "samples" / "final.png").write_bytes(b"png")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _print_summary(outcome)
    assert f"samples     {run_dir}/denoiselab/artifacts/samples/final.png" in buf.getvalue()
    assert "time" not in buf.getvalue()
    from orchestrator.runs.driver import phase_timings
    timings = phase_timings({"start": 0.0, "ray_start": 1.0, "ray_end": 6.0, "fit_start": 7.0},
                            {"worker_start": 15.0, "train_end": 80.0, "train_s": 60.0, "eval_end": 95.0}, 97.0)
    assert timings == {"ray_s": 5.0, "workers_s": 8.0, "setup_s": 5.0, "train_s": 60.0, "eval_s": 15.0,
                       "total_s": 97.0}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _print_summary(TrainOutcome("r", "abc", "sqlite:///x.db", None, False, str(run_dir), {}, timings))
    assert ("time        97 s: Ray 5.0 s, Train workers 8.0 s, setup 5.0 s, training 60.0 s, final evaluation "
            "15.0 s") in buf.getvalue()
    assert phase_timings({"start": 0.0}, {}, 1.0) == {}
