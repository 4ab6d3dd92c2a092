"""Damaged checkpoints are detected by their checksum and skipped for the previous good one;
retries back off inside a budget; spooled metrics round-trip into their MLflow run."""
from __future__ import annotations

import shutil

import pytest

from orchestrator.infra.checkpoints import newest_usable, read_state
from orchestrator.infra.retry import Backoff, first_line, retry_call
from orchestrator.infra.storage import open_storage
from orchestrator.infra.tracking import MetricSpool, WorkerTracker, ensure_experiment, find_or_create_run, \
    replay_spool
from orchestrator.runs.local import train_local
from tests.helpers import tiny_config
from trainers.build import resume_check
from trainers.checkpoint import CHECKSUM_FILE, STATE_FILE, first_usable, load_state, save_state
from trainers.errors import CheckpointError


def _state(step: int, name: str = "DiT-N/2") -> dict:
    return {"model": {}, "ema": {}, "config": {}, "step": step,
            "model_spec": {"name": name, "image_size": 8, "channels": 1}}


def test_save_writes_a_sha256sum_line_and_load_verifies_it(tmp_path):
    path = save_state(tmp_path / "step_1", _state(1))
    line = (tmp_path / "step_1" / CHECKSUM_FILE).read_text()
    assert line.endswith(f"  {STATE_FILE}\n") and len(line.split()[0]) == 64
    assert load_state(tmp_path / "step_1")["step"] == 1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])                    # truncated
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_state(tmp_path / "step_1")
    (tmp_path / "step_1" / CHECKSUM_FILE).unlink()               # a checkpoint from before checksums
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(tmp_path / "step_1")


def test_first_usable_skips_damaged_checkpoints_newest_first(tmp_path):
    for step in (10, 20, 30, 40):
        save_state(tmp_path / f"step_{step}", _state(step, "DiT-S/2" if step == 40 else "DiT-N/2"))
    (tmp_path / "step_30" / STATE_FILE).write_bytes(b"partial")  # truncated / partial upload
    shutil.rmtree(tmp_path / "step_20")                         # missing

    def check(state, label):
        if state["model_spec"]["name"] != "DiT-N/2":
            raise CheckpointError(f"{label}: another model")
    said = []
    candidates = [(f"step_{s}", lambda s=s: load_state(tmp_path / f"step_{s}")) for s in (40, 30, 20, 10)]
    state, skipped = first_usable(candidates, check, said.append)
    assert state["step"] == 10 and skipped == ["step_40", "step_30", "step_20"]
    assert len(said) == 3 and "another model" in said[0] and "checksum mismatch" in said[1]
    assert first_usable(candidates[:2], check)[0] is None


def test_newest_usable_reads_storage_and_refuses_when_nothing_is_left(tmp_path):
    storage = open_storage(str(tmp_path))
    for step in (1, 2):
        save_state(tmp_path / "run" / f"step_{step:08d}", _state(step))
    (tmp_path / "run" / "step_00000002" / STATE_FILE).write_bytes(b"\x00" * 10)
    said = []
    state, skipped = newest_usable(storage, "run", "step_00000002", lambda s, label: None, said.append)
    assert state["step"] == 1 and skipped == ["step_00000002"] and "resuming run from step 1" in said[-1]
    with pytest.raises(CheckpointError, match="missing"):
        read_state(storage, "run", "step_00000009", STATE_FILE)
    (tmp_path / "run" / "step_00000001" / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="none of its checkpoints is usable"):
        newest_usable(storage, "run", "step_00000002", lambda s, label: None, said.append)
    assert newest_usable(storage, "fresh-run", None, lambda s, label: None, said.append) == (None, [])


def test_a_whole_state_without_its_checksum_is_an_upload_cut_short(tmp_path):
    """Seen when a node died mid-upload: state.pt complete, checksum and metrics never written.
    In a run whose checkpoints carry checksums, such a checkpoint is skipped (its metrics were
    never sent, so resuming from it would lose them); a run from before checksums still resumes."""
    storage = open_storage(str(tmp_path))
    for step in (1, 2):
        save_state(tmp_path / "run" / f"step_{step:08d}", _state(step))
    (tmp_path / "run" / "step_00000002" / CHECKSUM_FILE).unlink()
    said = []
    state, skipped = newest_usable(storage, "run", None, lambda s, label: None, said.append)
    assert state["step"] == 1 and skipped == ["step_00000002"] and "upload incomplete" in said[0]
    (tmp_path / "run" / "step_00000001" / CHECKSUM_FILE).unlink()          # no checksums at all: legacy
    state, skipped = newest_usable(storage, "run", None, lambda s, label: None, said.append)
    assert state["step"] == 2 and skipped == []


def test_local_resume_falls_back_past_a_truncated_and_a_foreign_checkpoint(tmp_path, capsys):
    base = dict(train={"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 5}, storage={"path": str(tmp_path)},
                name="fallback")
    train_local(tiny_config(**base))
    run = tmp_path / "fallback"
    assert sorted(p.name for p in run.glob("step_*")) == [f"step_{s:08d}" for s in (2, 4, 6)]
    data = (run / "step_00000006" / STATE_FILE).read_bytes()
    (run / "step_00000006" / STATE_FILE).write_bytes(data[:-100])          # truncated
    other = tiny_config(model={"name": "DiT-S/2"})
    spec_check = resume_check(other, image_size=8, channels=1, num_classes=10)
    with pytest.raises(CheckpointError, match="different model config"):
        spec_check(load_state(run / "step_00000004"), "step_00000004")       # another model's view of it
    shutil.copy(run / "step_00000002" / STATE_FILE, run / "step_00000004" / STATE_FILE)   # replaced file
    capsys.readouterr()
    summary = train_local(tiny_config(**{**base, "train": {**base["train"], "steps": 8}}))
    err = capsys.readouterr().err
    assert "step_00000006 is unusable" in err and "step_00000004 is unusable" in err
    assert "resuming" in err and "from step 2" in err
    assert summary["step"] == 8


def test_retry_backs_off_within_the_budget_and_says_so_twice():
    now, slept, said, calls = [0.0], [], [], []

    def sleep(s):
        slept.append(s)
        now[0] += s

    def flaky():
        calls.append(now[0])
        if len(calls) < 5:
            raise ConnectionRefusedError("AWS Error NETWORK_CONNECTION during PutObject")
        return "done"
    assert retry_call(flaky, Backoff(budget=60), "upload", warn=said.append, sleep=sleep,
                      clock=lambda: now[0]) == "done"
    assert slept == [1.0, 2.0, 4.0, 8.0] and len(said) == 2
    assert "retrying for up to 60 s" in said[0] and "succeeded after 15 s and 4 failed" in said[1]
    now[0], slept[:] = 0.0, []
    with pytest.raises(ConnectionRefusedError):
        retry_call(lambda: (_ for _ in ()).throw(ConnectionRefusedError("down")), Backoff(budget=10), "upload",
                   warn=said.append, sleep=sleep, clock=lambda: now[0])
    assert sum(slept) == pytest.approx(10.0)
    with pytest.raises(ValueError):                              # not transient: no retry
        retry_call(lambda: (_ for _ in ()).throw(ValueError("bug")), Backoff(budget=10), "x", sleep=sleep)
    assert "AWS Error" not in first_line(ConnectionRefusedError("AWS Error NETWORK_CONNECTION x"))


def test_spooled_metrics_replay_into_their_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = ensure_experiment(uri, "spool")
    run_id, _ = find_or_create_run(uri, exp, "r", {})
    spool = MetricSpool(open_storage(str(tmp_path / "runs")), "r")
    spool.write(run_id, [("loss", 0.5 + i, 1000 + i, i) for i in range(1, 4)])
    spool.write(run_id, [("loss", 9.0, 2000, 4)])
    assert len(spool.files()) == 2
    assert replay_spool(spool, uri) == 4 and spool.files() == []
    tracker = WorkerTracker(uri, run_id)
    history = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, "loss"))
    assert history == [(1, 1.5), (2, 2.5), (3, 3.5), (4, 9.0)]


def test_a_fresh_run_under_a_reused_name_gets_its_own_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = ensure_experiment(uri, "names")
    tags = {"denoiselab.storage_uri": "s3://b/runs/x"}
    first, resumed = find_or_create_run(uri, exp, "x", tags)
    assert not resumed
    assert find_or_create_run(uri, exp, "x", tags) == (first, True)                 # a resume appends
    other, resumed = find_or_create_run(uri, exp, "x", {"denoiselab.storage_uri": "/elsewhere/x"})
    assert other != first and not resumed                                        # same name, other storage
    fresh, resumed = find_or_create_run(uri, exp, "x", tags, fresh=True)          # storage wiped: new run
    assert fresh not in (first, other) and not resumed
    assert find_or_create_run(uri, exp, "x", tags) == (fresh, True)
    tracker = WorkerTracker(uri, fresh)                                           # a fresh run keeps step 1
    tracker.add(1, {"loss": 1.0})
    tracker.flush()
    assert [m.step for m in tracker.client.get_metric_history(fresh, "loss")] == [1]


def test_the_null_tracker_answers_everything_the_worker_tracker_does():
    """Non-zero ranks get a NullTracker: any attribute the worker code may touch on rank 0 must
    exist there too (a resume past a damaged checkpoint once set ``committed`` on every rank)."""
    from orchestrator.infra.tracking import NullTracker
    public = {n for n in dir(WorkerTracker) if not n.startswith("_")} | {"committed"}
    assert not public - set(dir(NullTracker)), sorted(public - set(dir(NullTracker)))


class _StartingHead:
    """A Jobs API client whose head refuses ``fails`` submissions as a just-started head does."""

    def __init__(self, fails: int, error: str = "Request failed with status code 500: No available agent to submit "
                                                 "job, please try again later.."):
        self.fails, self.error, self.calls = fails, error, 0

    def submit_job(self, entrypoint: str, runtime_env: dict) -> str:
        self.calls += 1
        if self.calls <= self.fails:
            raise RuntimeError(self.error)
        return "raysubmit_1"


def test_submit_waits_for_a_starting_job_agent_and_refuses_the_rest_in_one_line(capsys):
    from orchestrator.cli.jobs import submit_when_ready
    from trainers.errors import UserError
    head = _StartingHead(fails=2)
    assert submit_when_ready(head, "denoiselab train c.yaml", {}, Backoff(5.0, first=0.01)) == "raysubmit_1"
    assert head.calls == 3 and "succeeded after" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"job agent was not ready after 0 s .*dashboard_agent.log"):
        submit_when_ready(_StartingHead(fails=99), "denoiselab train c.yaml", {}, Backoff(0.05, first=0.01))
    refused = _StartingHead(fails=1, error="Request failed with status code 400: bad runtime_env\nTraceback ...")
    with pytest.raises(UserError, match=r"^submit: the cluster refused the job: Request failed with status code "
                                        r"400: bad runtime_env$"):
        submit_when_ready(refused, "denoiselab train c.yaml", {}, Backoff(5.0, first=0.01))
    assert refused.calls == 1
