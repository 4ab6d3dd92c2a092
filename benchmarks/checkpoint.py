"""Checkpoint I/O of a full training state (model, EMA, AdamW moments): save to local disk (with
its sha256), upload to an S3 endpoint on loopback (a moto server in its own process), download +
verify + restore from each. The training loop waits only for the local save: the upload runs in
the background (``runs/reporter.py``), so "stall" is the save and "stall if synchronous" is save
+ upload. Medians over ``--repeats``, each measurement side by side in one run. The S3 figures
are those of a moto server (Python, in memory) on loopback: they measure moto as much as the
code, not what a real object store would do.

    .venv/bin/python benchmarks/checkpoint.py [--model DiT-B/2] [--input 4x32x32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.fs as pafs  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import emit, median, print_table  # noqa: E402
from orchestrator.infra.checkpoints import read_state  # noqa: E402
from orchestrator.infra.storage import open_storage  # noqa: E402
from trainers.checkpoint import CHECKSUM_FILE, STATE_FILE, load_state, save_state  # noqa: E402
from trainers.models import build_model, model_spec  # noqa: E402
from trainers.config import ModelConfig  # noqa: E402


def training_state(model_name: str, channels: int, size: int) -> tuple[dict, int]:
    spec = model_spec(ModelConfig(name=model_name), image_size=size, channels=channels, num_classes=1000,
                      learn_sigma=True)
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():                       # one step, so AdamW's two moments exist
        p.grad = torch.zeros_like(p)
    opt.step()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {"model": model.state_dict(), "ema": ema, "optimizer": opt.state_dict(), "config": {}, "step": 1,
             "model_spec": {"name": model_name}}
    return state, sum(p.numel() for p in model.parameters())


def moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="DiT-B/2")
    ap.add_argument("--input", default="4x32x32", help="CxHxW of the model input (latent 32x32x4 = 256 px)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    channels, size, _ = (int(x) for x in args.input.split("x"))
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto(port)
    try:
        import boto3
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        s3 = open_storage("s3://bench/ckpt", endpoint)
        state, params = training_state(args.model, channels, size)
        times: dict[str, list[float]] = {k: [] for k in ("save_local", "upload_s3", "restore_local", "restore_s3")}
        nbytes = 0
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                local = Path(tmp) / f"step_{r}"
                t = time.perf_counter()
                save_state(local, state)
                times["save_local"].append(time.perf_counter() - t)
                nbytes = (local / STATE_FILE).stat().st_size
                t = time.perf_counter()
                s3.fs.create_dir(s3.path(f"step_{r}"), recursive=True)
                for name in (STATE_FILE, CHECKSUM_FILE):                 # what the background upload does
                    pafs.copy_files(str(local / name), s3.path(f"step_{r}", name), destination_filesystem=s3.fs)
                times["upload_s3"].append(time.perf_counter() - t)
                t = time.perf_counter()
                restored = load_state(local)
                times["restore_local"].append(time.perf_counter() - t)
                t = time.perf_counter()
                restored = read_state(s3, f"step_{r}", STATE_FILE)
                times["restore_s3"].append(time.perf_counter() - t)
                assert restored["step"] == 1
    finally:
        server.terminate()
    med = {k: median(v) for k, v in times.items()}
    gb = nbytes / 1e9
    rows = [{"what": k, "seconds": med[k], "GB/s": gb / med[k]} for k in times]
    print(f"{args.model} input {args.input}: {params / 1e6:.1f}M parameters, checkpoint {gb:.2f} GB "
          f"(model + EMA + AdamW), {args.repeats} repeats, medians")
    print_table(rows, ["what", "seconds", "GB/s"])
    stall, sync = med["save_local"], med["save_local"] + med["upload_s3"]
    print(f"training waits {stall:.2f} s per checkpoint (local save); a synchronous upload would wait {sync:.2f} s "
          f"({sync / stall:.2f}x)")
    emit({"model": args.model, "params": params, "bytes": nbytes, **{f"{k}_s": v for k, v in med.items()},
          "stall_s": stall, "stall_if_sync_s": sync})


if __name__ == "__main__":
    main()
