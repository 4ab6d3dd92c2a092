"""Where a method's step time goes: the operators of a few steps under `torch.profiler`, per method.

For each method: the wall time per step, the device's busy time per step (the sum of its operators'
times), the number of kernel launches per step, and the operators that add the most device time.
A step whose wall time is well above its busy time waits on the host (launches, Python); one whose
busy time grew does more device work. Used to explain what PCGrad costs beyond vanilla.

    python3 benchmarks/profile_step.py --device cuda --model DiT-B/2 --batch 240 --image-size 32 \\
        --precision bf16 --intervals 8 --methods vanilla,ant-pcgrad
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.common import emit, print_table  # noqa: E402
from benchmarks.method_overhead import make_state, timed_steps  # noqa: E402
from trainers.step import train_step  # noqa: E402


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_method(method: str, args) -> tuple[dict, list[dict]]:
    state, batches = make_state(method, args.model, args.batch, args.image_size, args.device, args.precision,
                                args.intervals)
    timed_steps(state, batches, 0, args.warmup, args.device)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            x0, y = batches.get(step)
            train_step(state, x0, y, step)
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA] if cuda else []
    by_op: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():   # on the CPU, an operator's own CPU time stands for its device time
        us = _device_us(e) if cuda else e.self_cpu_time_total
        if e.device_type != torch.autograd.DeviceType.CUDA and us > 0:
            by_op[e.key] += us / args.steps / 1000
    summary = {"method": method, "wall_ms_per_step": 1000 * wall,
               "busy_ms_per_step": sum(by_op.values()) if kernels else float("nan"),   # operators' own device time
               "kernels_per_step": len(kernels) / args.steps if kernels else float("nan")}
    ops = [{"method": method, "op": k, "device_ms_per_step": v} for k, v in by_op.items()]
    del state, batches
    if cuda:
        torch.cuda.empty_cache()
    return summary, ops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="DiT-T/2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--intervals", type=int, default=8)
    p.add_argument("--methods", default="vanilla,ant-pcgrad")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    summaries, ops = [], {}
    for method in args.methods.split(","):
        summary, method_ops = profile_method(method, args)
        summaries.append(summary)
        ops[method] = {o["op"]: o["device_ms_per_step"] for o in method_ops}
    base = summaries[0]["method"]
    print(f"model {args.model}, batch {args.batch}, {args.image_size}x{args.image_size}, {args.device}, "
          f"{args.precision}, K={args.intervals}, {args.steps} profiled steps after {args.warmup}")
    print_table(summaries, ["method", "wall_ms_per_step", "busy_ms_per_step", "kernels_per_step"])
    for method in list(ops)[1:]:
        extra = sorted(((op, ms - ops[base].get(op, 0.0)) for op, ms in ops[method].items()),
                       key=lambda kv: -kv[1])[:args.top]
        if not extra:
            continue
        print(f"\noperators adding the most device time, {method} vs {base} (ms per step):")
        print_table([{"op": op, "extra_ms": ms, f"{method}_ms": ops[method][op], f"{base}_ms": ops[base].get(op, 0.0)}
                     for op, ms in extra], ["op", "extra_ms", f"{method}_ms", f"{base}_ms"])
    emit({"benchmark": "profile_step", "model": args.model, "device": args.device, "batch": args.batch,
          "summaries": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()} for s in summaries]})


if __name__ == "__main__":
    main()
