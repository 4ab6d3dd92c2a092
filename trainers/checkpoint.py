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

Integrity: beside every ``state.pt`` sits ``state.pt.sha256`` (``sha256sum`` format, written at
save time). Readers verify it when present, so a truncated, partial or replaced file is named as
such instead of failing deep inside ``torch.load``; :func:`first_usable` walks a run's checkpoints
newest first and returns the newest one that verifies, loads and passes the caller's check (the
fallback a resume uses). Checkpoints written before checksums existed load unverified.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from trainers.errors import CheckpointError

__all__ = ["save_state", "load_state", "state_to_bytes", "state_from_bytes", "check_compatible",
           "migrate_state", "STATE_FILE", "CHECKSUM_FILE", "METRICS_FILE", "FORMAT", "checksum_line", "verify_checksum",
           "first_usable", "Candidate"]

STATE_FILE = "state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"
METRICS_FILE = "metrics.jsonl"           # the metric points logged since the previous checkpoint (Ray runs)
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


def checksum_line(data: bytes) -> str:
    """``sha256sum`` format, so ``sha256sum -c state.pt.sha256`` checks a downloaded checkpoint."""
    return f"{hashlib.sha256(data).hexdigest()}  {STATE_FILE}\n"


def verify_checksum(data: bytes, line: Optional[str], source: str = "checkpoint") -> None:
    """Raise unless ``data`` matches the recorded checksum (``None``: no checksum recorded)."""
    if line is None:
        return
    expected = line.split()[0] if line.split() else ""
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise CheckpointError(f"{source}: checksum mismatch ({len(data)} bytes, sha256 {digest[:12]}… vs "
                              f"{expected[:12] or 'nothing'}… recorded at save time); the file is truncated, "
                              f"partial or was replaced - use an earlier step")


def state_from_bytes(data: bytes, source: str = "checkpoint", checksum: Optional[str] = None) -> dict:
    verify_checksum(data, checksum, source)
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
    """Write ``directory/state.pt`` and its checksum, each atomically (temp file + rename); the
    checksum goes last, so a checkpoint with a checksum is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    digest = hashlib.sha256()
    with open(tmp, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    os.replace(tmp, directory / STATE_FILE)
    tmp_sum = directory / f".{CHECKSUM_FILE}.tmp"
    tmp_sum.write_text(f"{digest.hexdigest()}  {STATE_FILE}\n")
    os.replace(tmp_sum, directory / CHECKSUM_FILE)
    return directory / STATE_FILE


def load_state(path: str | os.PathLike) -> dict:
    """Load (and verify) a checkpoint from a ``state.pt`` file or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found; check the run name or path")
    sidecar = path.with_name(CHECKSUM_FILE)
    checksum = sidecar.read_text() if path.name == STATE_FILE and sidecar.exists() else None
    return state_from_bytes(path.read_bytes(), str(path), checksum)


Candidate = tuple[str, Callable[[], dict]]      # (label, loader that raises CheckpointError/OSError)


def first_usable(candidates: Iterable[Candidate], check: Callable[[dict, str], None] = lambda s, label: None,
                 warn: Callable[[str], None] = lambda line: None) -> tuple[Optional[dict], list[str]]:
    """The newest checkpoint that loads, verifies and passes ``check`` -> (state, skipped labels).

    ``candidates`` come newest first; each damaged one is reported through ``warn`` in one line
    and skipped. ``(None, skipped)`` when none is usable (the caller decides: fresh start or error).
    """
    skipped: list[str] = []
    for label, load in candidates:
        try:
            state = load()
            check(state, label)
        except (CheckpointError, OSError) as err:
            skipped.append(label)
            warn(f"denoiselab: checkpoint {label} is unusable ({str(err).splitlines()[0][:200]}); "
                 f"trying the previous one")
            continue
        return state, skipped
    return None, skipped


def check_compatible(state: dict, spec: dict[str, Any], source: str = "checkpoint") -> None:
    """Refuse a checkpoint whose model spec differs from the configured one."""
    saved = state.get("model_spec", {})
    saved = {**saved, "family": saved.get("family", "DiT")}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in spec.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{source}: was trained with a different model config ({'; '.join(diffs[:3])}); "
                              f"use the matching model/data settings or start a new run")
