"""Run names cannot escape storage.path; a GPU asked for where there is none is refused in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from trainers.config import load_config
from trainers.errors import ConfigError


@pytest.mark.parametrize("name", ["../../escape_x", "/abs/run", "a/b", "..", ".hidden", "", "x" * 129, "bad name"])
def test_run_names_that_would_escape_or_hide_are_refused(name):
    with pytest.raises(ConfigError, match="name: .* must be 1-128 letters, digits"):
        load_config({"name": name})


@pytest.mark.parametrize("name", ["quickstart", "run-1.2_b", "meme-digits-expert0", "quickstart-r2", "m-dtr+ant-uw", "A" * 128])
def test_ordinary_run_names_pass(name):
    assert load_config({"name": name}).name == name


def test_escape_via_the_command_line_leaves_nothing_behind(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: DiT-N/2}}\nstorage: {{path: {tmp_path}/runs}}\n")
    out = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(cfg), "--local", "--set",
                          "name=../../escape_x"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "name: '../../escape_x' must be" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_gpu_requested_without_one_is_refused_locally(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: DiT-N/2}}\nscaling: {{use_gpu: true}}\nstorage: {{path: {tmp_path}/runs}}\n")
    out = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(cfg), "--local"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "scaling.use_gpu: torch sees no CUDA device" in lines[0]


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".hidden", "..", "x" * 65])
def test_study_names_that_would_escape_are_refused(name):
    from search.config import StudyError, study_from_dict
    with pytest.raises(StudyError, match=r"^name: .* must be 1-64 letters"):
        study_from_dict({"name": name, "base": {}, "space": {"optim": {}}})


def test_expert_set_names_are_run_names():
    """An expert set's name names its directory and its experts' runs (``NAME-expertN``)."""
    with pytest.raises(ConfigError, match=r"^name: '\.\./sets' must be"):
        load_config({"name": "../sets", "methods": {"meme": {"experts": [{}, {}]}}})
