"""DMP vs full fine-tuning vs prompt tuning on the same model: per-step time and peak memory.

DMP trains only prompts and a gate on a frozen backbone, so it should skip the backbone's weight
gradients, their optimizer state and the activations kept only for them. Time: the modes are
interleaved in rounds in one process (median per-step time). Memory of a step beyond the weights:
on CUDA the peak of ``torch.cuda.max_memory_allocated`` during one step; on the CPU the tensors
autograd saves for the backward pass (counted by storage during one real step) plus gradients of
the trainable parameters plus the optimizer's state.

    .venv/bin/python benchmarks/dmp.py [--model DiT-S/2] [--image-size 32] [--channels 4]
                                       [--batch 32] [--rounds 5] [--steps 10] [--device cpu]
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

MODES = {"fine_tuning": {"dmp": {"mode": "fine_tuning"}}, "dmp": {"dmp": {"mode": "add"}},
         "prompt_tuning": {"dmp": {"mode": "prompt_tuning"}}}


def _data(args) -> ArrayDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn((max(256, args.batch), args.channels, args.image_size, args.image_size), generator=gen)
    return ArrayDataset(images.clamp(-1, 1), torch.randint(0, 10, (len(images),), generator=gen), 10)


def _state(mode: str, args):
    """The mode's training state, started from the same base weights (a converged model's stand-in)."""
    batches = StepBatches(_data(args), args.batch)
    base_cfg = load_config({"model": {"name": args.model}, "train": {"batch_size": args.batch}})
    base = make_state(build_state(base_cfg, LocalRuntime("cpu"), batches))
    cfg = load_config({"model": {"name": args.model}, "methods": MODES[mode],
                       "train": {"batch_size": args.batch, "precision": args.precision, "lr": 1e-4}})
    ref = None if mode == "fine_tuning" else {"uri": "memory://base", "sha256": "-"}
    return build_state(cfg, LocalRuntime(args.device), batches, init=base, base_ref=ref), batches


def _steps(state, batches, start: int, n: int, device: str) -> list[float]:
    out = []
    for step in range(start, start + n):
        x0, y = batches.get(step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(state, x0, y, step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _cpu_training_memory(state, batches, step: int) -> float:
    """MiB a training step holds beyond the weights: tensors autograd saves for the backward pass
    (counted by storage during one real step), gradients of the trainable parameters, and the
    optimizer's state."""
    params = {p.untyped_storage().data_ptr() for p in state.raw_model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(state, *batches.get(step), step)
    grads = sum(p.numel() * p.element_size() for p in state.trainable())
    optim = sum(v.numel() * v.element_size() for st in state.optimizer.state.values() for v in st.values()
                if torch.is_tensor(v))
    return (sum(saved.values()) + grads + optim) / 2**20


def _memory(state, batches, step: int, device: str) -> float:
    if not device.startswith("cuda"):
        return _cpu_training_memory(state, batches, step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _steps(state, batches, step, 1, device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    states = {m: _state(m, args) for m in MODES}
    for m in MODES:
        _steps(*states[m], 0, args.warmup, args.device)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for m in MODES:
            times[m] += _steps(*states[m], args.warmup + r * args.steps, args.steps, args.device)
    done = args.warmup + args.rounds * args.steps
    memory = {m: _memory(*states[m], done, args.device) for m in MODES}
    base = median(times["fine_tuning"])
    trainable = {m: sum(p.numel() for p in states[m][0].trainable()) for m in MODES}
    rows = [{"mode": m, "ms_per_step": 1000 * median(times[m]), "time_vs_fine_tuning": median(times[m]) / base,
             "step_mib": memory[m], "memory_vs_fine_tuning": memory[m] / max(memory["fine_tuning"], 1e-9),
             "trainable_params": trainable[m]} for m in MODES]
    print(f"model {args.model}, input {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, "
          f"device {args.device}, {args.precision}, {args.rounds}x{args.steps} steps per mode")
    print_table(rows, ["mode", "ms_per_step", "time_vs_fine_tuning", "step_mib", "memory_vs_fine_tuning",
                       "trainable_params"])
    emit({"benchmark": "dmp", "model": args.model, "device": args.device, "batch": args.batch,
          "time_vs_fine_tuning": {r["mode"]: round(r["time_vs_fine_tuning"], 4) for r in rows},
          "step_mib": {r["mode"]: round(r["step_mib"], 1) for r in rows},
          "ms_per_step": {r["mode"]: round(r["ms_per_step"], 2) for r in rows}})


if __name__ == "__main__":
    main()
