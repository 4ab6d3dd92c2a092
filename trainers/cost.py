"""What a model costs: parameters and the measured FLOPs of one forward pass per image.

Counted with torch's own FLOP counter (``torch.utils.flop_counter.FlopCounterMode``) on a real
forward pass of the network the config builds, methods applied: on the ``meta`` device (shapes
only, no memory, so DiT-XL/2 is counted in a fraction of a second on a laptop), or on the CPU when
a model cannot run on meta. Matrix products, convolutions and attention are counted; elementwise
operations are not. Convention: 1 MAC (multiply-accumulate) = 2 FLOPs; the DiT paper's "Gflops"
are GMACs in this convention (DiT-XL/2 at 256 px: 118.6).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils import flop_counter

__all__ = ["ModelCost", "count_forward", "model_cost", "run_cost", "expert_set_cost"]


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


# The CPU's fused attention kernel is not in torch's table; meta decomposes attention into bmm.
_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@dataclass(frozen=True)
class ModelCost:
    params: int
    trainable_params: int
    added_params: int          # what method transforms add to the backbone (adapters)
    flops: int                 # one forward pass, one image
    macs: int                  # flops / 2
    input: tuple[int, ...]     # (C, H, W)
    device: str                # where it was counted: meta | cpu

    def to_dict(self) -> dict:
        out = asdict(self)
        out["input"] = "x".join(map(str, self.input))
        out["convention"] = "1 MAC = 2 FLOPs; one forward pass per image"
        return out


def count_forward(model: nn.Module, shape: tuple[int, ...], num_classes: int, device: str) -> int:
    """FLOPs of ``model(x, t, y)`` for one image of ``shape`` (C, H, W) on ``device``."""
    with torch.device(device):
        x = torch.zeros((1, *shape))
        t = torch.full((1,), 1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if num_classes > 0 else None
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(x, t, y)
    finally:
        model.train(was)
    return int(counter.get_total_flops())


def model_cost(build, shape: tuple[int, int, int], num_classes: int, device: Optional[str] = None) -> ModelCost:
    """Cost of the network ``build()`` returns (called under the counting device).

    ``device``: ``meta`` (default) builds and runs on shapes only; ``cpu`` really runs. If the
    model cannot run on meta, the CPU is used instead."""
    tried = [device] if device else ["meta", "cpu"]
    last: Optional[Exception] = None
    for dev in tried:
        try:
            with torch.device(dev):
                model = build()
            flops = count_forward(model, shape, num_classes, dev)
        except (NotImplementedError, RuntimeError) as err:        # an op without a meta kernel
            last = err
            continue
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        added = sum(p.numel() for n, p in model.named_parameters() if n.startswith("adapters."))
        return ModelCost(params, trainable, added, flops, flops // 2, tuple(shape), dev)
    raise RuntimeError(f"cannot count the model's FLOPs on {', '.join(tried)}: {last}")


def run_cost(cfg, *, channels: int, image_size: int, num_classes: int, device: Optional[str] = None) -> ModelCost:
    """Cost of the network a run config builds, its methods applied (a frozen backbone counts as
    not trainable). The interval partition does not change the network; a uniform one is used."""
    from trainers.build import build_context, build_network
    from trainers.methods import compose, resolve_intervals
    from trainers.weights import freeze_backbone
    intervals, _ = resolve_intervals("uniform", cfg.diffusion.steps, cfg.intervals.count)
    ctx = build_context(cfg, intervals, 1)
    plan = compose(cfg.methods, ctx)

    def build() -> nn.Module:
        model, _ = build_network(cfg, image_size=image_size, channels=channels, num_classes=num_classes,
                                 plan=plan, ctx=ctx, seed=cfg.train.seed)
        if plan.freeze_backbone:
            freeze_backbone(model)
        return model
    return model_cost(build, (channels, image_size, image_size), num_classes, device)


def expert_set_cost(cfg, *, channels: int, image_size: int, num_classes: int,
                    device: Optional[str] = None) -> dict:
    """A MEME set's cost: each expert, the set, and one sampling pass (``sample.steps`` respaced
    steps, each routed to one expert) against the single model ``methods.meme.baseline``."""
    import dataclasses
    from trainers.build import build_diffusion, resolve_run_intervals
    from trainers.methods.meme import expert_configs
    experts = expert_configs(cfg)
    intervals, _ = resolve_run_intervals(experts[0])
    timesteps = build_diffusion(cfg).respaced(cfg.sample.steps).timestep_map
    routed = torch.bincount(intervals.task_id(timesteps), minlength=intervals.num_intervals).tolist()
    rows = []
    for n, (expert, (lo, hi)) in enumerate(zip(experts, intervals.pairs())):
        cost = run_cost(expert, channels=channels, image_size=image_size, num_classes=num_classes, device=device)
        rows.append({"index": n, "interval": [lo, hi], "model": expert.model.name, "params": cost.params,
                     "macs": cost.macs, "sampling_steps": routed[n]})
    steps = sum(routed)
    out = {"experts": rows, "total_params": sum(r["params"] for r in rows), "sampling_steps": steps,
           "routed_macs_per_pass": sum(r["macs"] * r["sampling_steps"] for r in rows),
           "mean_params_per_step": sum(r["params"] * r["sampling_steps"] for r in rows) / steps,
           "baseline": None, "convention": "1 MAC = 2 FLOPs; one forward pass per image and step"}
    baseline = cfg.methods.meme.baseline
    if baseline:
        single = cfg.replace(model=dataclasses.replace(cfg.model, name=baseline, arch={}))
        single = single.replace(methods=type(cfg.methods)({k: v for k, v in cfg.methods.items() if k != "meme"}))
        cost = run_cost(single, channels=channels, image_size=image_size, num_classes=num_classes, device=device)
        out["baseline"] = {"model": baseline, "params": cost.params, "macs": cost.macs,
                           "macs_per_pass": cost.macs * steps,
                           "params_ratio": cost.params / out["mean_params_per_step"],
                           "macs_ratio": cost.macs * steps / out["routed_macs_per_pass"]}
    return out
