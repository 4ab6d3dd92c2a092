"""Sampling from checkpoints: rebuild the run's network from the checkpoint's own config."""
from __future__ import annotations

from typing import Optional

import torch

from orchestrator.checkpoints import read_checkpoint, resolve_checkpoint
from orchestrator.storage import open_storage
from trainers.build import build_all
from trainers.checkpoint import check_compatible
from trainers.config import load_config
from trainers.images import save_png
from trainers.loop import sample_grid
from trainers.methods import Intervals

__all__ = ["model_from_state", "sample_local"]


def model_from_state(state: dict, use_ema: bool = True, device: str = "cpu"):
    """(network, diffusion, cfg, spec) rebuilt from a checkpoint state."""
    cfg = load_config(state["config"])
    spec = state["model_spec"]
    model, diffusion, _, _, built = build_all(cfg, image_size=spec["image_size"], channels=spec["channels"],
                                              num_classes=spec["num_classes"],
                                              intervals=Intervals.from_list(state["intervals"]))
    check_compatible(state, built)
    model.load_state_dict(state["ema"] if use_ema else state["model"])
    return model.to(device).eval(), diffusion, cfg, spec


def sample_local(ref: str, *, n: int, out: str, steps: Optional[int] = None, sampler: Optional[str] = None,
                 guidance: Optional[float] = None, use_ema: bool = True, seed: int = 0, storage: str = "./runs",
                 endpoint: Optional[str] = None) -> str:
    state = read_checkpoint(resolve_checkpoint(ref, open_storage(storage, endpoint), endpoint))
    model, diffusion, cfg, spec = model_from_state(state, use_ema)
    scfg = cfg.sample
    overrides = {k: v for k, v in {"steps": steps, "sampler": sampler, "guidance": guidance}.items() if v is not None}
    cfg = cfg.replace(sample=scfg.__class__(**{**scfg.__dict__, **overrides}))
    images = sample_grid(model, diffusion, cfg, image_size=spec["image_size"], channels=spec["channels"],
                         num_classes=spec["num_classes"], n=n, device=torch.device("cpu"), seed=seed)
    save_png(out, images, scale=max(1, 64 // spec["image_size"]))
    return out
