"""Bad storage or tracking settings fail in seconds, with one line, before any worker starts."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port

DENOISELAB = [sys.executable, "-m", "orchestrator"]


def _run(tmp_path: Path, *sets: str) -> tuple[subprocess.CompletedProcess, float]:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name: DiT-N/2}\ntrain: {steps: 5, batch_size: 8}\n")
    start = time.monotonic()
    proc = subprocess.run([*DENOISELAB, "train", str(cfg), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return proc, time.monotonic() - start


def test_unreachable_s3_endpoint(tmp_path):
    port = free_port()
    proc, seconds = _run(tmp_path, "storage.path=s3://nowhere/runs", f"storage.endpoint=http://127.0.0.1:{port}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("denoiselab: error: storage.path: cannot reach s3://nowhere/runs"), proc.stderr
    assert "Traceback" not in proc.stderr and "ray" not in proc.stderr.lower().split("error:")[0]
    assert seconds < 30


def test_unreachable_tracking_server(tmp_path):
    port = free_port()
    proc, seconds = _run(tmp_path, f"tracking.uri=http://127.0.0.1:{port}", f"storage.path={tmp_path}/runs")
    assert proc.returncode == 2
    assert "tracking.uri: cannot reach the MLflow server" in proc.stderr.strip().splitlines()[-1]
    assert seconds < 30


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "train.stepz: unknown key; did you mean 'steps'?"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("model.name=DiT-Q/2", "model.name: 'DiT-Q/2' is not a known model"),
    ("methods.ant.mtl=adam", "methods.ant.mtl: 'adam' is not one of"),
])
def test_bad_config_one_line(tmp_path, override, needle):
    proc, _ = _run(tmp_path, override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize("override, needle", [
    ("tracking.uri=http://alice:s3cret-pw@127.0.0.1:5000", "tracking.uri: contains a user:password"),
    ("storage.endpoint=http://key:s3cret-pw@127.0.0.1:9000", "storage.endpoint: contains a user:password"),
])
def test_credentials_in_a_uri_are_refused_without_echoing_them(tmp_path, override, needle):
    proc, _ = _run(tmp_path, override, "storage.path=s3://bucket/runs")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "s3cret-pw" not in proc.stdout + proc.stderr


def test_resume_refuses_overrides_that_would_change_the_run(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name: DiT-N/2}\ntrain: {steps: 5, batch_size: 8}\n")
    proc = subprocess.run([*DENOISELAB, "train", str(cfg), "--resume", "some-run", "--set", "train.steps=9"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume some-run: continues the run with its stored config, so --set train.steps " \
        "cannot apply" in lines[0], proc.stderr


def test_unreadable_image_in_a_folder_is_one_line_and_writes_nothing(tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "ok.png")
    (folder / "x.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "prepared"
    proc = subprocess.run([*DENOISELAB, "data", "prepare", str(tmp_path / "imgs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{folder / 'x.png'}: not a readable image" in lines[0], proc.stderr
    assert not out.exists() or not any(out.rglob("*.parquet"))
