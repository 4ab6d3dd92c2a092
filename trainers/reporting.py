"""Reporters: where the loop sends metrics, checkpoints and artifacts.

The loop calls every method on every rank the same number of times (Ray Train's ``report`` is a
barrier); what a rank does with the call is the reporter's business. ``LocalReporter`` writes a
run directory on local disk (in-process runs and tests); the orchestrator's Ray reporter writes to
object storage and MLflow. Non-zero ranks get null behaviour instead of ``if rank == 0``.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Protocol, TextIO

from trainers.checkpoint import save_state

__all__ = ["Reporter", "LocalReporter", "ProgressLine", "checkpoint_dir_name"]


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class Reporter(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def checkpoint(self, step: int, state: Optional[dict], metrics: dict[str, float]) -> None: ...
    def artifact(self, name: str, data: bytes) -> None: ...
    def close(self, summary: dict) -> None: ...


class ProgressLine:
    """One updating line on a terminal (a plain line every ``every`` calls when not a TTY)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, every: int = 10):
        self.total, self.stream, self.every = total, stream, every
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._calls = 0

    def update(self, step: int, metrics: dict[str, float]) -> None:
        ips = metrics.get("images_per_s", 0.0)
        sps = metrics.get("steps_per_s", 0.0)
        eta = (self.total - step) / sps if sps > 0 else float("nan")
        line = (f"step {step}/{self.total}  loss {metrics.get('loss', float('nan')):.4f}  "
                f"{ips:.0f} img/s  ETA {_fmt_eta(eta)}")
        self._calls += 1
        if self.tty:
            self.stream.write("\r" + line.ljust(78))
            self.stream.flush()
        elif (self._calls - 1) % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds:
        return "--"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class LocalReporter:
    """``run_dir/step_XXXXXXXX/state.pt`` (keeping the newest ``keep``), ``metrics.jsonl``,
    ``artifacts/<name>``. Only the main rank writes."""

    def __init__(self, run_dir: str | Path, is_main: bool = True, keep: int = 3,
                 progress: Optional[ProgressLine] = None):
        self.run_dir, self.is_main, self.keep, self.progress = Path(run_dir), is_main, keep, progress
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.progress is not None:
            self.progress.update(step, metrics)

    def checkpoint(self, step: int, state: Optional[dict], metrics: dict[str, float]) -> None:
        if not self.is_main or state is None:
            return
        save_state(self.run_dir / checkpoint_dir_name(step), state)
        for old in sorted(self.run_dir.glob("step_*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def artifact(self, name: str, data: bytes) -> None:
        if not self.is_main:
            return
        path = self.run_dir / "artifacts" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def close(self, summary: dict) -> None:
        if self.progress is not None:
            self.progress.close()


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    steps = sorted(Path(run_dir).glob("step_*/state.pt"))
    return steps[-1].parent if steps else None
