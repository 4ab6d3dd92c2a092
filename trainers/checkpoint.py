"""Checkpoint files: one ``state.pt`` per checkpoint, written atomically, read with
``weights_only=True`` (no pickled code runs on load). A state holds everything needed to continue
bit-for-bit: model, EMA, optimizer, scaler, step, every plug-in's state and the resolved config.
Randomness needs no saved state: every step's generator is seeded from (seed, step), so the data
position and noise of step k are functions of k.

Format 2 (current): transforms live in adapters, so backbone keys never carry a method's name;
plug-in states have a ``pacer`` entry of their own; ``model_spec`` names its model family. Format 1
checkpoints are migrated on load (DTR's ``blocks.N.inner.*`` keys, the pacer inside the sampler).
A run on a frozen backbone stores only its adapter weights plus ``base`` (where the backbone
came from and its content hash).
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from trainers.errors import CheckpointError

__all__ = ["save_state", "load_state", "state_to_bytes", "state_from_bytes", "check_compatible",
           "migrate_state", "STATE_FILE", "FORMAT"]

STATE_FILE = "state.pt"
FORMAT = 2
_INNER = re.compile(r"^(blocks\.\d+\.)inner\.")


def migrate_state(state: dict) -> dict:
    """Bring an older checkpoint to the current format (in place; returns it)."""
    if int(state.get("format", 1)) >= FORMAT:
        return state
    for key in ("model", "ema"):
        if isinstance(state.get(key), dict):
            state[key] = {_INNER.sub(r"\1", k): v for k, v in state[key].items()}
    plugins = state.get("plugins", {})
    sampler = plugins.get("sampler", {})
    if isinstance(sampler, dict) and "pacer" in sampler and "pacer" not in plugins:
        plugins["pacer"] = sampler.pop("pacer")
    if isinstance(state.get("model_spec"), dict):
        state["model_spec"].setdefault("family", "DiT")
    state["format"] = FORMAT
    return state


def state_to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes, source: str = "checkpoint") -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"{source}: cannot be read as a denoiselab checkpoint "
                              f"({type(err).__name__}); it is corrupt or not a checkpoint - "
                              f"delete it or point at another step") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{source}: not a denoiselab checkpoint (no model/config entries)")
    return migrate_state(state)


def save_state(directory: str | os.PathLike, state: dict) -> Path:
    """Write ``directory/state.pt`` atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / STATE_FILE
    tmp = directory / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, target)
    return target


def load_state(path: str | os.PathLike) -> dict:
    """Load a checkpoint from a ``state.pt`` file or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found; check the run name or path")
    return state_from_bytes(path.read_bytes(), str(path))


def check_compatible(state: dict, spec: dict[str, Any], source: str = "checkpoint") -> None:
    """Refuse a checkpoint whose model spec differs from the configured one."""
    saved = state.get("model_spec", {})
    saved = {**saved, "family": saved.get("family", "DiT")}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in spec.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{source}: was trained with a different model config ({'; '.join(diffs[:3])}); "
                              f"use the matching model/data settings or start a new run")
