"""Kill the ``denoiselab train`` process (and the local Ray it started) mid-run; re-running the
same command resumes and ends with exactly the model of an uninterrupted run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import ray_run_dict, wait_for
from trainers.checkpoint import load_state

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cli(tmp_path: Path, cfg_file: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "train", str(cfg_file)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{cfg_file.stem}.log", "a"),
                            start_new_session=True)


def _kill_session(sid: int) -> None:
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def test_driver_killed_then_rerun_resumes_exactly(tmp_path):
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    base = ray_run_dict(train={"steps": 80, "checkpoint_every": 20, "log_every": 10},
                       tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"})
    for name in ("crashy", "steady"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**base, "name": name}))
    run = tmp_path / "runs" / "crashy"
    proc = _cli(tmp_path, tmp_path / "crashy.yaml", env)
    try:
        wait_for(lambda: (run / "step_00000040" / "state.pt").exists(), 240, 0.05, "a mid-run checkpoint")
        assert proc.poll() is None, "the run finished before it could be interrupted"
    finally:
        _kill_session(proc.pid)                        # driver and the local Ray it started
        proc.wait(30)
    assert not (run / "step_00000080").exists()
    procs = {"steady": _cli(tmp_path, tmp_path / "steady.yaml", env)}          # side by side with the resume,
    try:                                                                         # once its Ray is up
        wait_for(lambda: "starting run steady" in (tmp_path / "steady.log").read_text(), 120, 0.2, "steady to start")
        procs["crashy"] = _cli(tmp_path, tmp_path / "crashy.yaml", env)
        for name, p in procs.items():
            assert p.wait(400) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            _kill_session(p.pid)
    resumed = load_state(run / "step_00000080")
    steady = load_state(tmp_path / "runs" / "steady" / "step_00000080")
    assert "resuming run crashy" in (tmp_path / "crashy.log").read_text()
    for key in steady["model"]:
        assert torch.equal(resumed["model"][key], steady["model"][key]), key
    for key in steady["ema"]:
        assert torch.equal(resumed["ema"][key], steady["ema"][key]), key
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("denoiselab").experiment_id],
                              filter_string="tags.`denoiselab.run_name` = 'crashy'")
    assert len(runs) == 1
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert steps == list(range(10, 81, 10))
