"""Training throughput (images/s) of the trainers core on one device: DiT sizes on 32×32×4
latent-shaped inputs (the SD-VAE latent of a 256² image; 256 tokens at patch 2), vanilla vs the
methods. Random latents: this measures the step, not the data pipeline.

Model FLOPs per image come from the core's cost accounting (``trainers/cost.py``: counted on the
meta device, one forward); a training step counts 3x that (forward + backward). Achieved TFLOP/s
= 3 x FLOPs x images/s; MFU divides it by the device's dense bf16 peak (``PEAK_TFLOPS``, or
``--peak-tflops``). On a CPU it prints the FLOP/s without MFU.

    python3 benchmarks/throughput.py --device cuda --models DiT-S/2,DiT-B/2 --batch 256 --precision bf16
    .venv/bin/python benchmarks/throughput.py --device cpu --models DiT-N/2 --batch 8 --size 8   # smoke
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, median, print_table  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.data import ArrayDataset, StepBatches  # noqa: E402
from trainers.loop import build_state, make_state  # noqa: E402
from trainers.runtime import LocalRuntime  # noqa: E402
from trainers.step import train_step  # noqa: E402

PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}    # dense bf16, SXM parts (vendor data sheets)

METHODS = {"vanilla": {}, "dtr": {"dtr": {}}, "ant-uw": {"ant": {"mtl": "uw"}},
           "dtr+ant-uw": {"dtr": {}, "ant": {"mtl": "uw"}}, "ant-pcgrad": {"ant": {"mtl": "pcgrad"}},
           "ant-pcgrad-recompute": {"ant": {"mtl": "pcgrad", "interval_grads": "recompute"}},
           "ant-pcgrad-kxp": {"ant": {"mtl": "pcgrad"}}, "ant-nash": {"ant": {"mtl": "nash"}},
           "dmp": {"dmp": {}}}


def measure(model: str, method: str, args) -> dict:
    data = ArrayDataset(torch.randn(max(args.batch * 4, 64), args.channels, args.size, args.size),
                        torch.randint(0, 1000, (max(args.batch * 4, 64),)), 1000)
    cfg = load_config({"model": {"name": model}, "intervals": {"count": 8}, "methods": METHODS[method],
                       "train": {"batch_size": args.batch, "precision": args.precision, "compile": args.compile,
                                 "adamw": args.adamw}})
    batches = StepBatches(data, args.batch)
    init = ref = None
    if "dmp" in METHODS[method]:                      # DMP patches a converged model: random base weights here
        base_cfg = load_config({"model": {"name": model}, "train": {"batch_size": args.batch}})
        init, ref = make_state(build_state(base_cfg, LocalRuntime("cpu"), batches)), {"uri": "memory://base"}
    state = build_state(cfg, LocalRuntime(args.device), batches, init=init, base_ref=ref)
    if method.endswith("-kxp"):                       # the [K, P]-matrix path, for a before/after in one run
        from benchmarks.method_overhead import dense_kxp
        dense_kxp(state.plan.combiner)
    times = []
    for step in range(args.warmup + args.steps):
        x0, y = batches.get(step)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(state, x0, y, step)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in state.raw_model.parameters())
    from trainers.cost import run_cost
    flops = run_cost(cfg, channels=args.channels, image_size=args.size, num_classes=1000).flops
    mem = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    images_per_s = args.batch / median(times)
    tflops = 3 * flops * images_per_s / 1e12
    return {"model": model, "method": method, "params_M": params / 1e6, "gflops_per_image": flops / 1e9,
            "ms_per_step": 1000 * median(times), "images_per_s": images_per_s, "tflops": tflops,
            "mfu": tflops / args.peak_tflops if args.peak_tflops else float("nan"), "peak_mem_GiB": mem}


def device_peak(device: str, override: float | None) -> float | None:
    """Dense bf16 TFLOP/s of the device (None on a CPU or an unknown GPU without --peak-tflops)."""
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="DiT-S/2,DiT-B/2")
    p.add_argument("--methods", default="vanilla,dtr,ant-uw,dtr+ant-uw,ant-pcgrad,ant-pcgrad-recompute,ant-nash,dmp")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--adamw", default="auto", help="auto | fused | foreach | loop (train.adamw)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: from PEAK_TFLOPS)")
    args = p.parse_args()
    args.peak_tflops = device_peak(args.device, args.peak_tflops)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows, failed = [], []
    for model in args.models.split(","):
        base = None
        for method in args.methods.split(","):
            try:
                row = measure(model, method, args)
            except Exception as err:  # one failing row (OOM, a refused config) must not cost the others
                failed.append(f"{model} {method}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                print(f"FAILED {failed[-1]}", flush=True)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            base = base or row["ms_per_step"]
            row["time_vs_vanilla"] = row["ms_per_step"] / base
            rows.append(row)
            print_table([row], list(row))
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"\n{name}, batch {args.batch}, {args.channels}x{args.size}x{args.size}, {args.precision}, "
          f"compile={args.compile}, adamw={args.adamw}, median of {args.steps} steps after {args.warmup} warm-up")
    columns = ["model", "method", "params_M", "gflops_per_image", "ms_per_step", "images_per_s", "tflops",
               "time_vs_vanilla", "peak_mem_GiB"]
    print_table(rows, columns + (["mfu"] if args.peak_tflops else []))
    print(f"MFU against {args.peak_tflops:g} TFLOP/s dense bf16" if args.peak_tflops else
          "no MFU: no known peak for this device (give --peak-tflops)")
    for line in failed:
        print(f"failed: {line}")
    emit({"benchmark": "throughput", "device": name, "batch": args.batch, "precision": args.precision,
          "peak_tflops": args.peak_tflops, "failed": failed,
          "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]})


if __name__ == "__main__":
    main()
