"""Latent diffusion end to end on a tiny random ``AutoencoderKL``: encode (Ray tasks) -> Parquet
-> Ray Data -> Ray Train -> sample -> decode -> metrics; the manifest, posterior draws, resumed
encodes and the one-line refusals of bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator.infra.data_io import read_metadata
from orchestrator.infra.encoder import build_autoencoder, encode_uint8, encoder_sha256, init_encoder, load_payload
from orchestrator.infra.latents import draw_latents
from orchestrator.infra.storage import open_storage
from orchestrator.jobs.encode import EncodeRequest, encode_source, open_source
from trainers.config import load_config
from trainers.errors import DataError

from tests.helpers import run_cli

CLI = [sys.executable, "-m", "orchestrator"]


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The CLI in this process (diffusers and torch are imported once for the module)."""
    import contextlib
    import io
    from orchestrator.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    init_encoder(str(path))
    return str(path)


def _encode(encoder: str, out: Path, source: str = "shapes", **kw) -> dict:
    req = EncodeRequest(source, str(out), encoder, local=True, **kw)
    return encode_source(req, load_payload(encoder), open_source(source, num_samples=kw.pop("n", 96)))


def test_manifest_round_trip_and_stored_posterior(encoder, tmp_path):
    manifest = _encode(encoder, tmp_path / "lat", shard_size=40, flip=True)
    meta = read_metadata(open_storage(str(tmp_path / "lat")))
    assert meta == json.loads(json.dumps(manifest))
    assert (meta["kind"], meta["channels"], meta["image_size"], meta["resolution"]) == ("latents", 4, 8, 16)
    assert meta["count"] == 96 and meta["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert meta["encoder"]["sha256"] == encoder_sha256(encoder) and meta["encoder"]["downsample"] == 2
    assert meta["source"] == {"kind": "builtin", "name": "shapes", "image_size": 16, "num_classes": 4,
                              "num_samples": 96, "seed": 0}
    table = pq.read_table(tmp_path / "lat" / "part-00001.parquet")
    assert table.column_names == ["mean", "std", "mean_flip", "std_flip", "label"] and table.num_rows == 40
    src = open_source("shapes", num_samples=96)
    mean, std = encode_uint8(build_autoencoder(load_payload(encoder)), src.arrays[40:80])
    stored = np.stack([np.frombuffer(b, np.float16) for b in table.column("mean").to_pylist()]).reshape(mean.shape)
    assert np.allclose(stored, mean.numpy(), atol=2e-3, rtol=2e-3)
    stored_std = np.stack([np.frombuffer(b, np.float16) for b in table.column("std").to_pylist()]).reshape(std.shape)
    assert np.allclose(stored_std, std.numpy(), rtol=2e-3)
    mean_flip, _ = encode_uint8(build_autoencoder(load_payload(encoder)), src.arrays[40:80, :, ::-1].copy())
    flipped = np.stack([np.frombuffer(b, np.float16) for b in table.column("mean_flip").to_pylist()])
    assert np.allclose(flipped.reshape(mean.shape), mean_flip.numpy(), atol=2e-3, rtol=2e-3)
    assert table.column("label").to_pylist() == src.labels[40:80].tolist()


def test_posterior_draws_have_the_stored_statistics(encoder, tmp_path):
    _encode(encoder, tmp_path / "lat", shard_size=96, flip=True)
    meta = read_metadata(open_storage(str(tmp_path / "lat")))
    row = pq.read_table(tmp_path / "lat" / "part-00000.parquet").slice(3, 1).to_pydict()
    batch = {k: v * 4000 for k, v in row.items()}
    gen = torch.Generator().manual_seed(0)
    z, y = draw_latents(batch, meta, gen)
    scale = meta["encoder"]["scaling_factor"]
    mean = torch.from_numpy(np.frombuffer(row["mean"][0], np.float16).astype(np.float32)).reshape(4, 8, 8)
    std = torch.from_numpy(np.frombuffer(row["std"][0], np.float16).astype(np.float32)).reshape(4, 8, 8)
    # 4000 draws per element: the sample mean is within 5 standard errors, the std within 10 %
    assert ((z.mean(0) - mean * scale).abs() <= 5 * std * scale / np.sqrt(4000)).all()
    assert torch.allclose(z.std(0), std * scale, rtol=0.1)
    assert y is not None and (y == row["label"][0]).all()
    zf, _ = draw_latents(batch, meta, torch.Generator().manual_seed(1), flip=True)
    mean_flip = torch.from_numpy(np.frombuffer(row["mean_flip"][0], np.float16).astype(np.float32)).reshape(4, 8, 8)
    near_flip = ((zf - mean_flip * scale).abs() < (zf - mean * scale).abs()).float().mean((1, 2, 3)) > 0.5
    assert 0.45 < near_flip.float().mean() < 0.55                      # the mirrored latent half of the time


def test_interrupted_encode_resumes_shard_by_shard(encoder, tmp_path):
    out = tmp_path / "lat"
    _encode(encoder, out, shard_size=32)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    (out / "part-00001.parquet").unlink()
    (out / "_denoiselab.json").unlink()                                   # as if killed before the end
    manifest = _encode(encoder, out, shard_size=32)
    assert manifest["encoding"]["images"] == 32                           # only the missing shard
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00002.parquet"] == before["part-00002.parquet"]
    with pytest.raises(DataError, match="holds an encode with other settings \\(flip differ"):
        _encode(encoder, out, shard_size=32, flip=True)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "a" / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), "RGBA").save(root / "a" / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (40, 32), dtype=np.uint8), "L").save(root / "b" / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("P").save(root / "b" / "pal.gif")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_modes_converted_non_images_skipped(encoder, tmp_path):
    root = _folder(tmp_path / "imgs")
    out = _cli("data", "prepare", str(root), "--encoder", encoder, "--resolution", "16", "--local",
               "--out", str(tmp_path / "lat"))
    assert out.returncode == 0, out.stderr
    assert "converted 1 L, 1 P, 1 RGBA image(s) to RGB" in out.stdout
    assert "skipped 1 non-image file(s): b/notes.txt" in out.stdout
    meta = read_metadata(open_storage(str(tmp_path / "lat")))
    assert meta["count"] == 4 and meta["num_classes"] == 2 and meta["source"]["classes"] == ["a", "b"]


def test_bad_inputs_are_one_line(encoder, tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "a" / "broken.png").write_bytes(b"this is not a png")
    out = _cli("data", "prepare", str(root), "--encoder", encoder, "--resolution", "16", "--local",
               "--out", str(tmp_path / "lat"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "broken.png: not a readable image" in lines[0]
    wrong = tmp_path / "wrong-layout"
    wrong.mkdir()
    (wrong / "model.ckpt.index").write_text("x")
    out = _cli("data", "prepare", "shapes", "--encoder", str(wrong), "--local", "--out", str(tmp_path / "o"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "is not a diffusers AutoencoderKL directory" in lines[0]
    out = _cli("data", "prepare", "shapes", "--encoder", str(tmp_path / "none"), "--local", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "does not exist" in out.stderr.strip().splitlines()[-1]
    out = _cli("data", "prepare", "shapes", "--encoder", encoder, "--resolution", "15", "--local",
               "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "not divisible by the encoder's downsampling factor 2" in out.stderr


def test_missing_or_mismatched_encoder_refused_before_training(encoder, tmp_path):
    _encode(encoder, tmp_path / "lat", shard_size=96)
    other = tmp_path / "other-vae"
    init_encoder(str(other), seed=1)
    base = f"data: {{name: latents, path: {tmp_path}/lat}}\nmodel: {{name: DiT-N/2}}\nstorage: {{path: {tmp_path}/runs}}\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(base.replace("}\nmodel", f", encoder: {other}}}\nmodel", 1))
    out = _cli("train", str(cfg), cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "data.encoder:" in lines[-1] and "but the dataset was encoded with" in lines[-1]
    meta_file = tmp_path / "lat" / "_denoiselab.json"
    meta = json.loads(meta_file.read_text())
    meta["encoder"]["path"] = str(tmp_path / "moved-away")
    meta_file.write_text(json.dumps(meta))
    cfg.write_text(base)
    out = _cli("train", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "which is not on this machine; set data.encoder=PATH" in out.stderr
    cfg.write_text(base.replace("latents", "parquet", 1))
    out = _cli("train", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "holds latents; set data.name=latents" in out.stderr


def test_latent_runs_do_not_clamp():
    cfg = load_config({"data": {"name": "latents", "path": "/x"}})
    assert cfg.clip_x0 is False and cfg.data.pixels is False
    assert load_config({"data": {"name": "latents", "path": "/x"}, "sample": {"clip_x0": True}}).clip_x0 is True
    assert load_config({}).clip_x0 is True


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_latent_example_end_to_end(encoder, local_ray, _ray_session, tmp_path):
    """The shipped example, shortened: encode on Ray tasks, train on Ray Train, decoded grid,
    decoded samples scored with the shapes feature net, `denoiselab sample` decodes too. The CLI
    joins the shared Ray instance (RAY_ADDRESS) instead of starting its own twice."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "RAY_ADDRESS": _ray_session["address"], "RAY_API_SERVER_ADDRESS": _ray_session["api"]}
    run = lambda *a: run_cli(CLI, *a, timeout=280, cwd=tmp_path, env=env)  # noqa: E731
    out = run("data", "prepare", "shapes", "--num-samples", "512", "--encoder", encoder, "--scale-factor",
              "auto", "--flip", "--shard-size", "128", "--out", "runs/data/shapes-latents")
    assert out.returncode == 0, out.stderr
    assert "wrote 512 latents (4x8x8 from 16px images, 4 classes, posterior, with flips) in 4 shard(s)" in out.stdout
    example = Path(__file__).resolve().parents[2] / "orchestrator" / "experiments" / "latents_tiny.yaml"
    out = run("train", str(example), "--set", "train.steps=20", "--set", "train.checkpoint_every=10",
              "--set", "train.log_every=10", "--set", "eval.n=64", "--set", "eval.steps=5",
              "--set", "sample.steps=5", "--set", "sample.n=8", "--set", "train.batch_size=32")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fd_shapes" in out.stdout
    assert "Reporting training result" not in out.stderr and "Dataset train" not in out.stderr   # quiet console
    grid = tmp_path / "runs" / "latents-tiny" / "denoiselab" / "artifacts" / "samples" / "final.png"
    with Image.open(grid) as im:
        assert im.mode == "RGB" and im.size[0] > 0
    out = run("sample", "latents-tiny", "--n", "8", "--steps", "5", "--local", "--out", "samples")
    assert out.returncode == 0, out.stderr[-2000:]
    with np.load(tmp_path / "samples" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (8, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
