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


def test_prefetched_batches_match_the_source_and_the_loop_trains_with_them(tmp_path):
    """Step k+1's batch is copied on a side stream while step k runs: same tensors, on the device."""
    from trainers.prefetch import DevicePrefetch
    from trainers.loop import train
    from trainers.reporting import LocalReporter
    batches = StepBatches(load_digits(), 32)
    ahead = DevicePrefetch(batches, torch.device("cuda"), last_step=4)
    for step in range(4):
        x0, y = ahead.get(step)
        ref_x0, ref_y = batches.get(step)
        assert x0.is_cuda and torch.equal(x0.cpu(), ref_x0) and torch.equal(y.cpu(), ref_y)
    cfg = load_config({"model": {"name": "DiT-T/2"}, "diffusion": {"steps": 100}, "sample": {"n": 0},
                       "train": {"steps": 6, "batch_size": 32, "precision": "bf16", "log_every": 3,
                                 "checkpoint_every": 6}})
    summary = train(cfg, LocalRuntime("cuda"), LocalReporter(tmp_path), batches)
    assert summary["step"] == 6 and torch.isfinite(torch.tensor(summary["metrics"]["loss"]))


def test_fused_adamw_is_the_cuda_default_and_matches_foreach():
    from trainers.loop import make_optimizer
    cfg = load_config({"train": {"lr": 1e-2}})
    results = {}
    for kind in ("auto", "foreach"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000, device="cuda"))
        opt = make_optimizer(load_config({"train": {"lr": 1e-2, "adamw": kind}}), [{"params": [p]}],
                             torch.device("cuda"))
        assert bool(opt.defaults.get("fused")) is (kind == "auto")
        for _ in range(5):
            p.grad = torch.sin(p.detach() * 3)
            opt.step()
        results[kind] = p.detach().clone()
    assert cfg.train.adamw == "auto"
    torch.testing.assert_close(results["auto"], results["foreach"], rtol=1e-5, atol=1e-6)


def test_attention_takes_the_flash_kernel_at_bf16():
    """DiT attention goes through SDPA; at bf16 the flash kernel alone must be able to run it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    state, batches = _state({}, "bf16")
    x0, y = batches.get(0)
    x, t, y = x0.cuda(), torch.zeros(32, dtype=torch.long, device="cuda"), y.cuda()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        out = state.raw_model(x, t, y)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("label", ["vanilla", "dtr+ant-uw"])
def test_the_step_never_waits_for_the_device(label):
    """With the sum combiner the step queues its work without one host synchronisation: CUDA's
    sync debug mode reports every synchronising call (PCGrad, Nash-MTL, fp16's GradScaler and the
    adaptive curriculum read the device by design)."""
    import warnings

    from trainers.loop import DivergenceWatch
    from trainers.prefetch import on_device
    from trainers.step import device_step
    state, batches = _state(METHODS[label], "bf16")
    source, watch = on_device(batches, torch.device("cuda"), 8), DivergenceWatch()
    for s in range(2):                       # first steps: AdamW state, schedule arrays on the device
        watch.update(device_step(state, *source.get(s), s), s + 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s in range(2, 6):
                watch.update(device_step(state, *source.get(s), s), s + 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "ynchroniz" in str(w.message)]
    assert not syncs, "\n".join(syncs)
    watch.check(0)


@pytest.mark.parametrize("label", ["dtr+ant-uw", "ant-pcgrad"])
def test_compile_on_cuda_matches_eager(label):
    """train.compile at bf16 trains like the eager model (PCGrad runs eagerly by design)."""
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = load_config({"model": {"name": "DiT-T/2"}, "diffusion": {"steps": 100}, "intervals": {"count": 4},
                           "methods": METHODS[label], "train": {"batch_size": 32, "lr": 1e-3, "precision": "bf16",
                                                                "compile": compiled}})
        batches = StepBatches(load_digits(), 32)
        state = build_state(cfg, LocalRuntime("cuda"), batches)
        losses[compiled] = [train_step(state, *batches.get(s), s)["loss"] for s in range(4)]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-2, atol=1e-3)
