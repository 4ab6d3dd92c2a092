"""``denoiselab train --local``: the trainers loop in this process, no Ray and no MLflow.
Checkpoints and artifacts go to ``storage.path/NAME`` (local paths only); re-running resumes."""
from __future__ import annotations

import sys
from pathlib import Path

from trainers.build import resume_check
from trainers.checkpoint import first_usable, load_state
from trainers.config import RunConfig, run_name_for
from trainers.data import training_batches
from trainers.errors import CheckpointError, ConfigError
from trainers.loop import train
from trainers.reporting import LocalReporter, ProgressLine
from trainers.runtime import LocalRuntime

__all__ = ["train_local"]


def train_local(cfg: RunConfig) -> dict:
    if cfg.storage.path.startswith("s3://") or cfg.data.stored:
        raise ConfigError("--local: runs only with a local storage.path and built-in data; drop --local to use Ray")
    import torch
    if cfg.scaling.use_gpu and not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu: torch sees no CUDA device here; set scaling.use_gpu=false (or install "
                          "a CUDA build of torch on a GPU machine)")
    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    run_dir = Path(cfg.storage.path) / run_name_for(cfg)
    batches = training_batches(cfg)
    steps = sorted((p for p in run_dir.glob("step_*") if p.is_dir()), reverse=True)
    resume, skipped = first_usable([(p.name, lambda p=p: load_state(p)) for p in steps],
                                   resume_check(cfg, image_size=batches.image_size, channels=batches.channels,
                                                num_classes=batches.num_classes),
                                   warn=lambda line: print(line, file=sys.stderr))
    if resume is None and steps:
        raise CheckpointError(f"{run_dir}: none of its {len(steps)} checkpoint(s) is usable; move the run aside "
                              f"(or delete it) to start again")
    if resume is not None:
        print(f"denoiselab: resuming {run_dir} from step {resume['step']}", file=sys.stderr)
    reporter = LocalReporter(run_dir, keep=cfg.train.keep_checkpoints, progress=ProgressLine(cfg.train.steps))
    summary = train(cfg, LocalRuntime(device), reporter, batches, resume=resume)
    print(f"run {run_dir}: step {summary['step']}, loss {summary['metrics'].get('loss', float('nan')):.4f}; "
          f"samples in {run_dir / 'artifacts' / 'samples'}")
    return summary
