"""``denoiselab cost CONFIG``: what the network a config builds costs, before a cluster is booked.

Parameters, trainable parameters (a frozen backbone does not count), MACs and FLOPs of one
forward pass per image, measured with torch's FLOP counter (``trainers/cost.py``). The input
geometry is the config's data (read from the dataset's metadata for Parquet data) unless
``--input CxHxW`` / ``--classes N`` say otherwise.
"""
from __future__ import annotations

import json
import re

from orchestrator.cli.common import add_config_args
from trainers.errors import ConfigError

__all__ = ["register", "geometry_for", "cost_table", "set_table"]


def register(sub) -> None:
    p = sub.add_parser("cost", help="parameters and FLOPs per image of the model a config builds")
    add_config_args(p, required=False)
    p.add_argument("--input", metavar="CxHxW", help="input shape (default: the config's data), e.g. 4x32x32")
    p.add_argument("--classes", type=int, help="number of classes (default: the config's data; 0 = unconditional)")
    p.add_argument("--device", choices=["meta", "cpu"], help="count on shapes only (meta, default) or really run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_cost)


def geometry_for(cfg, shape: str | None = None, classes: int | None = None) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) of a run config, with optional overrides."""
    if cfg.data.stored and shape is not None and classes is not None:
        channels, size, num = 0, 0, 0                     # both given: no need to read the dataset
    else:
        from orchestrator.infra.data_io import run_geometry
        channels, size, num = run_geometry(cfg)
    if shape is not None:
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", shape.strip())
        if not match or match.group(2) != match.group(3):
            raise ConfigError(f"--input: {shape!r} is not CxHxW with H = W, e.g. 4x32x32")
        channels, size = int(match.group(1)), int(match.group(2))
    if classes is not None:
        if classes < 0:
            raise ConfigError("--classes: must be >= 0 (0 = unconditional)")
        num = classes
    return channels, size, num


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f}"


def cost_table(cfg, cost, classes: int) -> str:
    methods = "+".join(cfg.methods.enabled()) or "vanilla"
    rows = [("model", f"{cfg.model.name} ({methods})"),
            ("input", f"{'x'.join(map(str, cost.input))}, {classes} classes"),
            ("params", f"{cost.params:,}"),
            ("trainable", f"{cost.trainable_params:,}"),
            ("added", f"{cost.added_params:,} (+{100 * cost.added_params / max(1, cost.params - cost.added_params):.2f} "
                      f"% of the backbone, by the methods)"),
            ("MACs/image", _si(cost.macs)),
            ("FLOPs/image", _si(cost.flops)),
            ("convention", f"1 MAC = 2 FLOPs; one forward pass; counted on {cost.device}")]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


def set_table(cfg, result: dict) -> str:
    lines = [f"expert set {cfg.name}: {len(result['experts'])} experts, {result['total_params']:,} params in all"]
    for e in result["experts"]:
        lo, hi = e["interval"]
        lines.append(f"  expert {e['index']}  t in {f'[{lo}, {hi})':<12} {e['model']:<9} {e['params']:>12,} params  "
                     f"{_si(e['macs'])} MACs/image  {e['sampling_steps']} of {result['sampling_steps']} sampling steps")
    lines.append(f"sampling     {result['sampling_steps']} steps ({cfg.sample.sampler}): "
                 f"{_si(result['routed_macs_per_pass'])} MACs per image routed; "
                 f"{result['mean_params_per_step']:,.0f} params per step on average")
    b = result["baseline"]
    if b:
        lines.append(f"baseline     {b['model']}: {b['params']:,} params, {_si(b['macs_per_pass'])} MACs per image "
                     f"-> the set uses {b['params_ratio']:.2f}x fewer params per step, {b['macs_ratio']:.2f}x fewer MACs")
    lines.append("convention   1 MAC = 2 FLOPs; one forward pass per image and sampling step; counted on meta")
    return "\n".join(lines)


def _cmd_cost(args) -> int:
    from orchestrator.infra.config_io import load_run_config
    from trainers.cost import run_cost
    cfg = load_run_config(args.config, args.overrides)
    channels, size, classes = geometry_for(cfg, args.input, args.classes)
    if cfg.methods.meme is not None and cfg.methods.meme.expert is None:          # a MEME expert set
        from trainers.cost import expert_set_cost
        result = expert_set_cost(cfg, channels=channels, image_size=size, num_classes=classes, device=args.device)
        print(json.dumps({"set": cfg.name, "classes": classes, **result}) if args.json else set_table(cfg, result))
        return 0
    cost = run_cost(cfg, channels=channels, image_size=size, num_classes=classes, device=args.device)
    if args.json:
        print(json.dumps({"model": cfg.model.name, "methods": cfg.methods.enabled(), "classes": classes,
                          **cost.to_dict()}))
    else:
        print(cost_table(cfg, cost, classes))
    return 0
