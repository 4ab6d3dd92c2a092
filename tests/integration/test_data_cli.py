"""`denoiselab data prepare` round trips, rank-aware shard reading, `train --local` + `sample`,
and the one-line errors for bad data."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from orchestrator.infra.data_io import read_dataset, read_metadata
from orchestrator.infra.storage import open_storage
from trainers.data import load_digits

CLI = [sys.executable, "-m", "orchestrator"]


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_prepare_digits_round_trip_and_rank_shards(tmp_path):
    out = _cli("data", "prepare", "digits", "--out", str(tmp_path / "digits"), "--shard-size", "500")
    assert out.returncode == 0, out.stderr
    storage = open_storage(str(tmp_path / "digits"))
    meta = read_metadata(storage)
    assert meta["count"] == 1797 and meta["shards"] == [f"part-0000{i}.parquet" for i in range(4)]
    whole = read_dataset(storage)
    original = load_digits()
    # 17 grey levels scaled to uint8 and back: exact up to the uint8 step
    assert torch.allclose(whole.images, original.images, atol=1 / 127.5) and torch.equal(whole.labels, original.labels)
    r0, r1 = read_dataset(storage, rank=0, world_size=2), read_dataset(storage, rank=1, world_size=2)
    assert len(r0) + len(r1) == 1797 and len(r0) == 1000
    assert torch.equal(torch.cat([r0.images[:500], r1.images[:500], r0.images[500:], r1.images[500:]]), whole.images)
    # a run on it checks everything before Ray starts; the Ray Dataset comes only once Ray is
    # connected (read_parquet would start an instance of its own, without the run's settings)
    import ray
    from orchestrator.runs.driver import TrainRequest, prepare_run
    from trainers.config import load_config
    cfg = load_config({"data": {"name": "parquet", "path": str(tmp_path / "digits")}, "model": {"name": "DiT-N/2"},
                       "storage": {"path": str(tmp_path / "runs")}, "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}})
    prep = prepare_run(TrainRequest(cfg))
    assert prep.payload["data_meta"]["count"] == 1797 and not ray.is_initialized()


def test_prepare_npz_and_image_folder(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images, labels=np.arange(10) % 2)
    assert _cli("data", "prepare", str(tmp_path / "x.npz"), "--out", str(tmp_path / "npz")).returncode == 0
    back = read_dataset(open_storage(str(tmp_path / "npz")))
    assert back.num_classes == 2 and back.images.shape == (10, 3, 8, 8)
    assert np.array_equal(((back.images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy(), images)
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(images[i]).save(tmp_path / "folder" / cls / f"{i}.png")
    assert _cli("data", "prepare", str(tmp_path / "folder"), "--out", str(tmp_path / "f")).returncode == 0
    folder = read_dataset(open_storage(str(tmp_path / "f")))
    assert folder.num_classes == 2 and folder.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_mixed_size_image_folder_is_one_line(tmp_path):
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "mixed" / "b.png")
    out = _cli("data", "prepare", str(tmp_path / "mixed"), "--out", str(tmp_path / "o"))
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()
    assert len(line) == 1 and "b.png: size 16x16 differs from a.png (8x8)" in line[0]


def test_missing_parquet_dataset_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{name: parquet, path: {tmp_path}/nothing}}\nstorage: {{path: {tmp_path}/runs}}\n")
    out = _cli("train", str(cfg), cwd=tmp_path)
    assert out.returncode == 2
    assert "has no _denoiselab.json; create the dataset with `denoiselab data prepare`" in out.stderr.strip().splitlines()[-1]


def test_train_local_resume_then_sample(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: loc\nmodel: {name: DiT-N/2}\ndiffusion: {steps: 100}\n"
                   "train: {steps: 10, batch_size: 16, checkpoint_every: 5}\nsample: {n: 4, steps: 5}\n")
    first = _cli("train", str(cfg), "--local", "--set", "train.steps=5", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = _cli("train", str(cfg), "--local", cwd=tmp_path)
    assert second.returncode == 0 and "resuming" in second.stderr and "from step 5" in second.stderr
    grid = tmp_path / "grid.png"
    out = _cli("sample", str(tmp_path / "runs" / "loc" / "step_00000010"), "--n", "9", "--out", str(grid),
               "--steps", "5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with Image.open(grid) as im:
        assert im.size == (196, 196) and len(set(im.convert("L").getdata())) > 2   # 3x3 grid of 64px tiles, not blank


def test_corrupt_checkpoint_is_one_line(tmp_path):
    (tmp_path / "run" / "step_00000001").mkdir(parents=True)
    (tmp_path / "run" / "step_00000001" / "state.pt").write_bytes(b"not a checkpoint")
    out = _cli("sample", str(tmp_path / "run" / "step_00000001"), "--n", "4", cwd=tmp_path)
    assert out.returncode == 2
    assert "cannot be read as a denoiselab checkpoint" in out.stderr.strip().splitlines()[-1]
