"""Every loader of checkpoints, manifests, weights and arrays refuses a crafted pickle whose
``__reduce__`` would run code: the marker file it would create never appears, and the command
ends with one line naming the file (no traceback)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from orchestrator.cli.main import main
from orchestrator.infra.data_io import from_npz
from orchestrator.infra.checkpoints import read_checkpoint, read_state, resolve_checkpoint
from orchestrator.infra.encoder import load_payload
from orchestrator.infra.storage import open_storage
from orchestrator.runs.local import train_local
from tests.helpers import tiny_config
from trainers.build import load_affinity
from trainers.checkpoint import CHECKSUM_FILE, STATE_FILE, checksum_line, load_state, state_from_bytes
from trainers.errors import UserError
from trainers.eval.inception import load_inception


class Payload:
    """Unpickling this runs ``os.system('touch MARKER')``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a crafted pickle ran code"


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _plant(run_dir, data: bytes, step: str = "step_00000004") -> None:
    """A checkpoint whose checksum matches, so only the loader itself stands in the way."""
    d = run_dir / step
    d.mkdir(parents=True)
    (d / STATE_FILE).write_bytes(data)
    (d / CHECKSUM_FILE).write_text(checksum_line(data))


@pytest.mark.parametrize("kind", ["torch-zip", "plain-pickle"])
def test_checkpoint_readers_refuse_it(tmp_path, marker, kind):
    evil = Payload(str(marker))
    data = (_torch_bytes({"model": evil, "config": {}}) if kind == "torch-zip"
            else pickle.dumps({"model": evil, "config": {}}))
    _plant(tmp_path / "runs" / "evil", data)
    storage = open_storage(str(tmp_path / "runs"))
    for load in (lambda: state_from_bytes(data, "x"), lambda: load_state(tmp_path / "runs" / "evil" / "step_00000004"),
                 lambda: read_state(storage, "evil", "step_00000004", STATE_FILE),
                 lambda: read_checkpoint(resolve_checkpoint("evil", storage))):             # sample/evaluate/init_from
        with pytest.raises(UserError, match="cannot be read as a denoiselab checkpoint"):
            load()


def test_sample_and_evaluate_commands_refuse_it(tmp_path, marker, capsys):
    _plant(tmp_path / "runs" / "evil", _torch_bytes({"model": Payload(str(marker)), "config": {}}))
    for argv in (["sample", "evil", "--local", "--n", "2"], ["evaluate", "evil", "--local", "--n", "2"]):
        assert main([*argv, "--storage", str(tmp_path / "runs"), "--out" if argv[0] == "sample" else "--json",
                     *([str(tmp_path / "out")] if argv[0] == "sample" else [])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot be read as a denoiselab checkpoint" in err[0], err


def test_resume_skips_it_and_refuses_when_nothing_else_is_left(tmp_path, marker):
    cfg = tiny_config(name="evil", storage={"path": str(tmp_path)}, train={"steps": 6})
    _plant(tmp_path / "evil", _torch_bytes({"model": Payload(str(marker)), "config": {}}))
    with pytest.raises(UserError, match="none of its 1 checkpoint"):
        train_local(cfg)


def test_expert_set_manifest_pointing_at_it_is_refused(tmp_path, marker):
    data = _torch_bytes({"model": Payload(str(marker)), "config": {}})
    _plant(tmp_path / "runs" / "e0", data)
    manifest = {"name": "set", "config": {}, "intervals": [[0, 99]],
                "experts": [{"index": 0, "checkpoint": str(tmp_path / "runs" / "e0" / "step_00000004" / STATE_FILE),
                             "sha256": hashlib.sha256(data).hexdigest()}]}
    (tmp_path / "runs" / "set" / "denoiselab").mkdir(parents=True)
    (tmp_path / "runs" / "set" / "denoiselab" / "experts.json").write_text(json.dumps(manifest))
    storage = open_storage(str(tmp_path / "runs"))
    with pytest.raises(UserError, match="cannot be read as a denoiselab checkpoint"):
        read_checkpoint(resolve_checkpoint("set", storage))


def test_weight_files_refuse_it(tmp_path, marker):
    evil = _torch_bytes({"encoder.conv_in.weight": Payload(str(marker))})
    enc = tmp_path / "vae"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (enc / "diffusion_pytorch_model.bin").write_bytes(evil)
    with pytest.raises(UserError, match="cannot be read"):
        load_payload(str(enc))
    (tmp_path / "inception.pt").write_bytes(evil)
    with pytest.raises(UserError, match="could not be read"):
        load_inception(tmp_path / "inception.pt")


def test_array_files_refuse_pickled_objects(tmp_path, marker):
    objects = np.empty(1, dtype=object)
    objects[0] = Payload(str(marker))
    np.savez(tmp_path / "tas.npz", tas=objects)
    np.savez(tmp_path / "data.npz", images=objects)
    with pytest.raises(UserError, match="not a task-affinity artifact"):
        load_affinity(str(tmp_path / "tas.npz"))
    with pytest.raises(UserError, match="expected an .npz"):
        from_npz(str(tmp_path / "data.npz"))
