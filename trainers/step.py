"""The one place where the per-step order of the method slots is written (docs/architecture.md).

    t, w       = sampler.sample(...)                 sampler (uniform / ANT stratified / MEME soft),
                                                     narrowed by the pacer (curriculum)
    x_t        = q_sample(x0, t, ε)
    out        = model(x_t, t, y)                    transforms act inside (DTR, DMP adapters)
    ℓ_n        = w_n·(λ(t)·mse_n + vb_n)             per sample [N]; λ = Min-SNR / P2
    S_k, C_k   = per-interval sums and counts        (one all-reduce for counts + metrics)
    aux        = Σ aux_loss(model)                   auxiliary terms (DMP prompt balancing)
    .grad      = combiner(weighter(S/C) + aux)       weighter (mean / UW), combiner (sum / PCGrad / Nash)
    optimizer.step(); ema.update(); pacer.observe(global loss) -> sampler.restrict(pacer.allowed())

The step never waits for the device unless a pacer watches the loss (the adaptive curriculum), a
per-interval combiner reads the device (PCGrad's Gram matrix every step; Nash-MTL its mask and clip
norm every step), or fp16's GradScaler checks for infinities: the randomness is drawn on
the host and copied asynchronously from pinned memory, the interval counts come from the host's
copy of the global timesteps, and the metrics come back as a :class:`StepOutput` of device
tensors, read (one synchronisation) only when the loop logs or checkpoints; finiteness is checked
on the device every step (``StepOutput.finite``).

All randomness of step k (t, ε, label dropout) is drawn for the GLOBAL batch from a generator
seeded by (seed, k); each rank keeps its slice. Resume therefore needs no RNG state, and a run's
randomness does not depend on when it was interrupted.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from trainers.diffusion import GaussianDiffusion
from trainers.diffusion.weighting import loss_weight
from trainers.ema import EMA
from trainers.methods import Intervals, Plan
from trainers.runtime import Runtime, sync_gradients

__all__ = ["TrainState", "StepOutput", "train_step", "device_step", "step_generator", "draw_randomness",
           "to_device", "sample_weight", "ScaledWeighter"]


@dataclass
class TrainState:
    model: torch.nn.Module            # possibly DDP-wrapped
    raw_model: torch.nn.Module        # the network itself
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: Optional[Any]             # torch.amp.GradScaler for fp16, else None
    diffusion: GaussianDiffusion
    plan: Plan
    intervals: Intervals
    runtime: Runtime
    cfg: Any                          # RunConfig
    null_class: Optional[int]         # label index for "no class" (CFG), None if unconditional
    step: int = 0
    spec: Optional[dict] = None       # the model spec as stored in checkpoints
    base_ref: Optional[dict] = None   # frozen backbone: where its weights come from

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.raw_model.parameters() if p.requires_grad]


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


def draw_randomness(state: TrainState, step: int, local_n: int, shape: tuple[int, ...]):
    """(t [n], w [n], ε [n, ...], drop [n], t of the global batch) on the host: this rank's slice of
    the global draw of step ``step``, and the global timesteps (every rank knows them, so the
    per-interval counts need neither the device nor a collective)."""
    rt = state.runtime
    gen = step_generator(state.cfg.train.seed, step)
    draws = [state.plan.sampler.sample(local_n, gen) for _ in range(rt.world_size)]
    t, w = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    eps = torch.randn((local_n * rt.world_size, *shape), generator=gen)
    drop = torch.rand(local_n * rt.world_size, generator=gen) < state.cfg.model.class_dropout
    sl = slice(rt.rank * local_n, (rt.rank + 1) * local_n)
    return t[sl], w[sl], eps[sl], drop[sl], t


def to_device(tensor: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """A host tensor on ``device`` without waiting for it: on CUDA it is pinned and copied
    asynchronously (a plain copy from pageable memory synchronises the host with the device)."""
    if tensor is None or tensor.device == device:
        return tensor
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _autocast(state: TrainState):
    precision, device = state.cfg.train.precision, state.runtime.device
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def sample_weight(lcfg, snr_t: torch.Tensor) -> torch.Tensor:
    """Per-sample weight on the MSE part (Min-SNR / P2; the vb term is never weighted)."""
    params = {"constant": {}, "min_snr": {"gamma": lcfg.gamma}, "p2": {"gamma": lcfg.p2_gamma, "k": lcfg.p2_k}}
    return loss_weight(lcfg.weighting, snr_t, **params[lcfg.weighting])


@dataclass
class _Draw:
    """One step's randomness placed on the device, with what the host knows about it."""
    t: torch.Tensor                   # [N] this rank's timesteps (device)
    task: torch.Tensor                # [N] their interval ids (device)
    counts: torch.Tensor              # [K] samples per interval in the GLOBAL batch (host, int64)


def _per_sample_loss(state: TrainState, x0, y, step: int):
    dev = state.runtime.device
    t, w_t, eps, drop, t_global = draw_randomness(state, step, x0.shape[0], tuple(x0.shape[1:]))
    k = state.intervals.num_intervals
    draw = _Draw(t=to_device(t, dev), task=to_device(state.intervals.task_id(t), dev),
                 counts=torch.bincount(state.intervals.task_id(t_global), minlength=k))
    t, x0, w_t, eps = draw.t, to_device(x0, dev), to_device(w_t, dev), to_device(eps, dev)
    if y is not None and state.null_class is not None:
        y = to_device(y, dev)
        y = torch.where(to_device(drop, dev), torch.full_like(y, state.null_class), y)
    xt = state.diffusion.q_sample(x0, t, eps)
    state.plan.begin_step(state.raw_model, step, state.runtime.rank)
    with _autocast(state):
        out = state.model(xt, t, y)
    terms = state.diffusion.training_losses(out.float(), x0, xt, t, eps)
    lam = sample_weight(state.cfg.loss, state.diffusion.gather("snr", t, 1))      # [N], Min-SNR / P2
    return w_t * (lam * terms.mse + terms.vb), terms, draw                       # [N]


def _aux_losses(state: TrainState) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """Sum of the plan's auxiliary terms, read from the model after its forward pass (the logged
    terms stay on the device)."""
    total, logged = None, {}
    for aux in state.plan.aux_losses:
        value, terms = aux(state.raw_model)
        total = value if total is None else total + value
        logged.update({k: torch.as_tensor(v).detach() for k, v in terms.items()})
    return total, logged


class ScaledWeighter:
    """fp16: the weighter's scalar goes through the GradScaler before backward."""

    def __init__(self, inner, scaler):
        self.inner, self.scaler = inner, scaler

    def reduce(self, task_loss, task_count, active):
        return self.scaler.scale(self.inner.reduce(task_loss, task_count, active))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _optimizer_step(state: TrainState) -> torch.Tensor:
    params = state.trainable()
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    clip = state.cfg.train.grad_clip
    grads = [p.grad for p in params if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return norm.detach()


@dataclass
class StepOutput:
    """One step's global metrics, still on the device. ``finite()`` is a device-side check;
    ``resolve()`` reads everything to the host at once (the loop calls it only when it logs)."""
    glob: torch.Tensor                # [4, K]: per-interval counts, loss, ε-MSE and vb sums over all ranks
    grad_norm: torch.Tensor           # [] total gradient norm before clipping
    lr: float
    stats: dict                       # the combiner's metrics (host floats)
    aux: dict                         # auxiliary loss terms (device scalars)

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.glob[1].sum())

    def resolve(self) -> dict[str, float]:
        glob = self.glob.detach().cpu()
        counts = glob[0]
        n = float(counts.sum().clamp(min=1.0))
        out = {"loss": float(glob[1].sum()) / n, "mse": float(glob[2].sum()) / n, "vb": float(glob[3].sum()) / n,
               "grad_norm": float(self.grad_norm), "lr": self.lr, **self.stats,
               **{k: float(v) for k, v in self.aux.items()}}
        for i in range(glob.shape[1]):
            if counts[i] > 0:
                out[f"interval/loss_{i}"] = float(glob[1][i] / counts[i])
        return out


def train_step(state: TrainState, x0: torch.Tensor, y: Optional[torch.Tensor], step: int) -> dict[str, float]:
    """One optimisation step, its metrics read to the host (tests, benchmarks; the loop reads
    them only at logging steps, through :func:`device_step`)."""
    return device_step(state, x0, y, step).resolve()


def device_step(state: TrainState, x0: torch.Tensor, y: Optional[torch.Tensor], step: int) -> StepOutput:
    """One optimisation step on this rank's batch; its global metrics (identical on ranks) stay
    on the device."""
    rt, plan, k = state.runtime, state.plan, state.intervals.num_intervals
    manual = plan.combiner.manual_sync(step) and rt.world_size > 1
    capture = plan.combiner.capture(state.raw_model, state.trainable(), step)
    with (rt.no_sync(state.model) if manual else contextlib.nullcontext()), capture:
        loss_n, terms, draw = _per_sample_loss(state, x0, y, step)
        task, dev = draw.task, loss_n.device                                     # [N]
        sums = torch.zeros(k, device=dev).index_add(0, task, loss_n)             # [K], differentiable
        ones = torch.ones_like(loss_n, dtype=torch.float32)      # counts by index_add: bincount waits on CUDA
        local = torch.stack([torch.zeros(k, device=dev).index_add(0, task, ones), sums.detach(),
                             torch.zeros(k, device=dev).index_add(0, task, terms.mse.detach()),
                             torch.zeros(k, device=dev).index_add(0, task, terms.vb.detach())])
        glob = rt.all_reduce(local.clone(), op="sum")                             # [4, K]
        counts = glob[0]                                                          # = draw.counts, on the device
        host_active = plan.sampler.active_intervals() & (draw.counts > 0)        # [K] bool, host
        active = to_device(host_active, dev)
        task_loss = rt.world_size * sums / counts.clamp(min=1.0)                  # surrogate, see weighters.py
        extra, aux_metrics = _aux_losses(state)
        if extra is not None and state.scaler is not None:
            extra = state.scaler.scale(extra)
        weighter = plan.weighter if state.scaler is None else ScaledWeighter(plan.weighter, state.scaler)
        stats = plan.combiner.combine(step, task_loss, counts, active, weighter, state.trainable(), rt, task=task,
                                      extra=extra)
    plan.weighter.after_backward(host_active)
    sync_gradients([p for g in plan.weighter.param_groups() for p in g.params], rt)   # outside DDP
    grad_norm = _optimizer_step(state)
    state.ema.update(state.raw_model)
    out = StepOutput(glob=glob, grad_norm=grad_norm, lr=state.optimizer.param_groups[0]["lr"], stats=stats,
                     aux=aux_metrics)
    if getattr(plan.pacer, "watches", True):              # a pacer reads the global loss every step
        row = {"loss": 1, "mse": 2}[plan.pacer.monitor]
        watched = float(glob[row].sum() / counts.sum().clamp(min=1.0))
        if math.isfinite(watched) and plan.pacer.observe(watched):   # non-finite: the loop reports it
            plan.sync_pacer()
    state.step = step + 1
    return out
