"""CUDA checks of trainers/ (run on a GPU machine: `python3 -m pytest tests/gpu`); skipped without one.

They exercise what CPU tests cannot: autocast bf16/fp16 with the GradScaler, every gradient
combiner on the device, DTR mask gathers on CUDA, and GPU/CPU agreement of the network.
"""
from __future__ import annotations

import pytest
import torch

from trainers.checkpoint import state_from_bytes, state_to_bytes
from trainers.config import load_config
from trainers.data import StepBatches, load_digits
from trainers.diffusion import sample
from trainers.loop import build_state, make_state
from trainers.runtime import LocalRuntime
from trainers.step import train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

METHODS = {"vanilla": {}, "dtr+ant-uw": {"dtr": {}, "ant": {"mtl": "uw"}},
           "ant-pcgrad": {"ant": {"mtl": "pcgrad"}}, "ant-nash": {"ant": {"mtl": "nash", "nash_every": 2}},
           "curriculum": {"curriculum": {"clusters": 4, "pacing": "fixed", "stage_steps": 2}}}


def _state(methods: dict, precision: str = "fp32"):
    cfg = load_config({"model": {"name": "DiT-T/2"}, "diffusion": {"steps": 100}, "intervals": {"count": 4},
                       "methods": methods, "train": {"batch_size": 32, "lr": 1e-3, "precision": precision}})
    batches = StepBatches(load_digits(), 32)
    return build_state(cfg, LocalRuntime("cuda"), batches), batches


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("label", list(METHODS))
def test_train_steps_on_cuda(label, precision):
    if precision == "fp16" and label in ("ant-pcgrad", "ant-nash"):
        pytest.skip("fp16 with per-interval gradients is refused by design")
    state, batches = _state(METHODS[label], precision)
    before = {k: v.clone() for k, v in state.raw_model.state_dict().items()}
    losses = [train_step(state, *batches.get(s), s)["loss"] for s in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = sum(not torch.equal(before[k], v) for k, v in state.raw_model.state_dict().items())
    assert changed > 0
    restored = state_from_bytes(state_to_bytes(make_state(state)))
    assert restored["step"] == 6 and set(restored["model"]) == set(before)


def test_dtr_beta_one_equals_vanilla_on_cuda():
    torch.manual_seed(0)
    vanilla, _ = _state({})
    routed, _ = _state({"dtr": {"active_ratio": 1.0}})
    x = torch.randn(8, 1, 8, 8, device="cuda")
    t = torch.randint(0, 100, (8,), device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.no_grad():
        assert torch.equal(vanilla.raw_model(x, t, y), routed.raw_model(x, t, y))


def test_gpu_matches_cpu_forward():
    state, _ = _state({"dtr": {}})
    model = state.raw_model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(8, 1, 8, 8)
    t = torch.randint(0, 100, (8,))
    y = torch.randint(0, 10, (8,))
    with torch.no_grad():
        gpu = model(x.cuda(), t.cuda(), y.cuda()).cpu()
        cpu = model.cpu()(x, t, y)
    assert torch.allclose(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_sampling_on_cuda_is_seeded():
    state, _ = _state({})
    model, diffusion = state.ema.model, state.diffusion
    def draw(seed: int):
        return sample(model, diffusion, (4, 1, 8, 8), steps=10, y=torch.arange(4, device="cuda"), null_class=10,
                      guidance=2.0, generator=torch.Generator().manual_seed(seed), device="cuda")
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (4, 1, 8, 8) and a.abs().max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
