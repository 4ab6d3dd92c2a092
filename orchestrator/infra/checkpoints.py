"""Find checkpoints by reference: a run name (latest checkpoint), a checkpoint directory, or a
``state.pt`` file, on local disk or ``s3://``."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Optional

from orchestrator.infra.storage import Storage, StorageError, open_storage
from trainers.checkpoint import STATE_FILE, state_from_bytes

__all__ = ["CheckpointRef", "resolve_checkpoint", "latest_step", "read_checkpoint"]


@dataclass(frozen=True)
class CheckpointRef:
    storage: Storage
    parts: tuple[str, ...]        # path of state.pt under storage.root

    @property
    def uri(self) -> str:
        return self.storage.uri_of(*self.parts)

    def payload(self) -> dict:
        return {"storage": self.storage.uri, "parts": list(self.parts), "uri": self.uri}


def latest_step(storage: Storage, run_name: str) -> Optional[str]:
    steps = [d for d in storage.listdir(run_name) if d.startswith("step_") and storage.exists(run_name, d, STATE_FILE)]
    return steps[-1] if steps else None


def resolve_checkpoint(ref: str, runs: Storage, endpoint: Optional[str] = None,
                       region: Optional[str] = None) -> CheckpointRef:
    """``ref`` = run name in ``runs`` | checkpoint dir | state.pt path (local or s3://)."""
    if "/" not in ref and runs.exists(ref):
        step = latest_step(runs, ref)
        if step is None:
            raise StorageError(f"{ref}: run has no checkpoint yet in {runs.uri}")
        return CheckpointRef(runs, (ref, step, STATE_FILE))
    path = ref.rstrip("/")
    if not path.endswith(STATE_FILE):
        path = posixpath.join(path, STATE_FILE)
    parent, name = posixpath.split(path)
    grand, step = posixpath.split(parent)
    storage = open_storage(grand, endpoint, region)
    if not storage.exists(step, name):
        raise StorageError(f"{ref}: no checkpoint found there (expected a run name in {runs.uri}, a checkpoint "
                           f"directory or a {STATE_FILE} file)")
    return CheckpointRef(storage, (step, name))


def read_checkpoint(ref: CheckpointRef) -> dict:
    return state_from_bytes(ref.storage.read_bytes(*ref.parts), ref.uri)
