"""Find checkpoints by reference: a run name (latest checkpoint), a checkpoint directory, or a
``state.pt`` file, on local disk or ``s3://``.

A checkpoint of a run on a frozen backbone (DMP) holds only what the run added, plus ``base``:
the URI and SHA-256 of the checkpoint it patches. :func:`read_checkpoint` fetches that base,
verifies its hash, and returns a complete state (the base's backbone + the run's own weights), so
sampling, evaluation and every other reader see an ordinary checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Optional

from orchestrator.infra.storage import Storage, StorageError, open_storage
from trainers.checkpoint import CHECKSUM_FILE, STATE_FILE, first_usable, state_from_bytes
from trainers.errors import CheckpointError
from trainers.weights import backbone_weights

__all__ = ["CheckpointRef", "resolve_checkpoint", "latest_step", "read_checkpoint", "read_base", "base_reference",
           "complete_state", "sha256", "EXPERT_SET_MANIFEST", "read_expert_set", "read_state", "resume_candidates",
           "newest_usable"]

EXPERT_SET_MANIFEST = ("denoiselab", "experts.json")     # <storage>/<set>/denoiselab/experts.json (MEME)


@dataclass(frozen=True)
class CheckpointRef:
    storage: Storage
    parts: tuple[str, ...]        # path of state.pt under storage.root

    @property
    def uri(self) -> str:
        return self.storage.uri_of(*self.parts)

    def payload(self) -> dict:
        return {"storage": self.storage.uri, "parts": list(self.parts), "uri": self.uri}


def read_state(storage: Storage, *parts: str) -> dict:
    """``parts`` -> a ``state.pt`` under ``storage``, verified against its ``state.pt.sha256``
    when one was written beside it."""
    uri = storage.uri_of(*parts)
    try:
        data = storage.read_bytes(*parts)
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: checkpoint file is missing") from None
    checksum = None
    if parts[-1] == STATE_FILE and storage.exists(*parts[:-1], CHECKSUM_FILE):
        checksum = storage.read_bytes(*parts[:-1], CHECKSUM_FILE).decode(errors="replace")
    return state_from_bytes(data, uri, checksum)


def resume_candidates(storage: Storage, run_name: str, also: Optional[str] = None) -> list:
    """The run's stored checkpoints (plus ``also``, Ray Train's latest), newest first, as
    :func:`trainers.checkpoint.first_usable` candidates.

    Storage, not Ray's snapshot, decides: a checkpoint whose upload completed but whose report
    never reached Ray's controller (it died first) is still the newest state, and its metrics were
    already sent to MLflow - resuming from an older one would log those steps twice. A checkpoint
    without its checksum in a run whose others have one is an upload cut short, and is skipped."""
    steps = {d for d in storage.listdir(run_name) if d.startswith("step_")}
    if also:
        steps.add(also)
    summed = {step for step in steps if storage.exists(run_name, step, CHECKSUM_FILE)}

    def load(step: str) -> dict:
        # the checksum is uploaded last: once a run writes them, a checkpoint without one is an
        # upload cut short (its metrics were never sent), even when its state.pt happens to be whole
        if summed and step not in summed:
            raise CheckpointError(f"{storage.uri_of(run_name, step)}: upload incomplete (no {CHECKSUM_FILE}, "
                                  f"which is written last)")
        return read_state(storage, run_name, step, STATE_FILE)
    return [(step, lambda step=step: load(step)) for step in sorted(steps, reverse=True)]


def newest_usable(storage: Storage, run_name: str, also: Optional[str], check, warn) -> tuple[Optional[dict], list]:
    """(state, skipped): the state a resume continues from - the newest stored checkpoint that
    verifies, loads and passes ``check`` - and the damaged ones skipped on the way (each reported
    through ``warn``). ``(None, [])`` when the run has no checkpoint at all."""
    candidates = resume_candidates(storage, run_name, also)
    if not candidates:
        return None, []
    state, skipped = first_usable(candidates, check, warn)
    if state is None:
        raise CheckpointError(f"{storage.uri_of(run_name)}: none of its checkpoints is usable "
                              f"({', '.join(skipped)}); start a new run with --restart")
    if skipped:
        warn(f"denoiselab: resuming {run_name} from step {state.get('step')} (skipped damaged "
             f"{', '.join(skipped)})")
    return state, skipped


def latest_step(storage: Storage, run_name: str) -> Optional[str]:
    steps = [d for d in storage.listdir(run_name) if d.startswith("step_") and storage.exists(run_name, d, STATE_FILE)]
    return steps[-1] if steps else None


def resolve_checkpoint(ref: str, runs: Storage, endpoint: Optional[str] = None,
                       region: Optional[str] = None) -> CheckpointRef:
    """``ref`` = run name in ``runs`` | an expert set's name | checkpoint dir | state.pt path (local or s3://)."""
    if "/" not in ref and runs.exists(ref, *EXPERT_SET_MANIFEST):
        return CheckpointRef(runs, (ref, *EXPERT_SET_MANIFEST))
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_reference(ref: CheckpointRef, data: bytes) -> dict:
    """What a frozen-backbone run records about the checkpoint it patches."""
    return {"uri": ref.uri, "sha256": sha256(data), "weights": "ema"}


def read_base(base: dict, endpoint: Optional[str] = None, region: Optional[str] = None) -> dict:
    """The base checkpoint a patch references, after checking it is still the same file."""
    uri = base["uri"]
    parent, name = posixpath.split(uri)
    try:
        data = open_storage(parent, endpoint, region).read_bytes(name)
    except (OSError, StorageError) as err:
        raise CheckpointError(f"base checkpoint {uri}: cannot be read ({str(err).splitlines()[0][:120]}); the "
                              f"patch needs the checkpoint it was trained on - restore it, or patch another "
                              f"base in a new run (--restart)") from None
    digest = sha256(data)
    if digest != base["sha256"]:
        raise CheckpointError(f"base checkpoint {uri}: has changed since the patch was trained (sha256 "
                              f"{digest[:12]}… vs {base['sha256'][:12]}…); restore the original, or patch the "
                              f"new one in a new run (--restart)")
    return state_from_bytes(data, uri)


def complete_state(state: dict, endpoint: Optional[str] = None, region: Optional[str] = None) -> dict:
    """A patch checkpoint with its base's backbone filled in (other checkpoints unchanged)."""
    if not state.get("base"):
        return state
    base = read_base(state["base"], endpoint, region)
    full = {k: v for k, v in state.items() if k != "base"}
    for key in ("model", "ema"):
        full[key] = {**backbone_weights(base["ema"]), **state[key]}
    full["patched_base"] = dict(state["base"])
    return full


def read_checkpoint(ref: CheckpointRef, complete: bool = True) -> dict:
    """The checkpoint at ``ref``; a patch comes back completed with its (verified) base, an
    expert set as one state holding every expert (``kind: expert_set``)."""
    if ref.parts[-len(EXPERT_SET_MANIFEST):] == EXPERT_SET_MANIFEST:
        return read_expert_set(ref)
    state = read_state(ref.storage, *ref.parts)
    return complete_state(state, ref.storage.endpoint) if complete else state


def read_expert_set(ref: CheckpointRef) -> dict:
    """Every expert of a MEME set (each checkpoint verified against the manifest's SHA-256),
    reduced to what sampling needs, plus the set's config and intervals."""
    manifest = json.loads(ref.storage.read_bytes(*ref.parts))
    experts = []
    for entry in manifest["experts"]:
        parent, name = posixpath.split(entry["checkpoint"])
        data = open_storage(parent, ref.storage.endpoint).read_bytes(name)
        if sha256(data) != entry["sha256"]:
            raise CheckpointError(f"expert set {manifest['name']}: the checkpoint of expert {entry['index']} "
                                  f"({entry['checkpoint']}) has changed since the set was written; re-run "
                                  f"`denoiselab experts` to write a new manifest")
        state = complete_state(state_from_bytes(data, entry["checkpoint"]), ref.storage.endpoint)
        experts.append({k: state[k] for k in ("config", "model_spec", "intervals", "step", "ema")})
    return {"kind": "expert_set", "name": manifest["name"], "config": manifest["config"],
            "intervals": manifest["intervals"], "experts": experts, "model_spec": experts[0]["model_spec"],
            "step": max(int(e["step"]) for e in experts), "manifest": manifest}
