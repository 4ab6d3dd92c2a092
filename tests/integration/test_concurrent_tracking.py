"""Concurrent writers: 8 processes, each a trial's rank-0 tracker (the ``WorkerTracker`` Ray Train
workers use), create their runs and log 3 metrics x 100 steps (10 commits) at the same time - into one fresh
sqlite store (created by all 8 at once) and into one ``mlflow server``. No errors, and every
point arrives (counted per run and per metric)."""
from __future__ import annotations

import multiprocessing as mp

from mlflow.tracking import MlflowClient

from tests.integration.conftest import running_mlflow_server

WRITERS, STEPS, FLUSH_EVERY = 8, 100, 10
KEYS = ("loss", "lr", "grad_norm")


def _trial(args: tuple[tuple[str, ...], str, int]) -> list[tuple[str, int]]:
    """One writer, once per store: its run, then STEPS points per key, flushed every FLUSH_EVERY steps."""
    uris, runs_dir, i = args
    return [_log(uri, f"{runs_dir}/{n}", i) for n, uri in enumerate(uris)]


def _log(uri: str, runs_dir: str, i: int) -> tuple[str, int]:
    from orchestrator.infra.storage import open_storage
    from orchestrator.infra.tracking import MetricSpool, WorkerTracker, ensure_experiment, find_or_create_run
    exp = ensure_experiment(uri, "concurrent")
    name = f"trial-{i}"
    run_id, _ = find_or_create_run(uri, exp, name, {"denoiselab.storage_uri": f"{runs_dir}/{name}"})
    said: list[str] = []
    tracker = WorkerTracker(uri, run_id, spool=MetricSpool(open_storage(runs_dir), name), retry_seconds=60,
                            say=said.append)
    for step in range(1, STEPS + 1):
        tracker.add(step, {k: float(step * (j + 1) + i) for j, k in enumerate(KEYS)})
        if step % FLUSH_EVERY == 0:
            tracker.flush()
    tracker.close()
    return run_id, tracker.spooled + len(said)


def _check(uri: str, results: list[tuple[str, int]]) -> int:
    client = MlflowClient(uri)
    assert len({run_id for run_id, _ in results}) == WRITERS
    counted = 0
    for run_id, troubles in results:
        assert troubles == 0, f"run {run_id} met errors or spooled metrics"
        for key in KEYS:
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(1, STEPS + 1)), f"{key} of {run_id}: {len(steps)} points"
            counted += len(steps)
    return counted


def test_eight_writers_on_a_fresh_sqlite_store_and_on_a_server(tmp_path):
    sqlite = f"sqlite:///{tmp_path}/fresh.db"                 # does not exist yet: all 8 create it at once
    (tmp_path / "server").mkdir()
    with running_mlflow_server(tmp_path / "server") as server:
        import mlflow.tracking  # noqa: F401 - loaded once here; the forked writers share it
        with mp.get_context("fork").Pool(WRITERS) as pool:
            per_writer = pool.map_async(_trial, [((sqlite, server), str(tmp_path / "runs"), i)
                                                 for i in range(WRITERS)], chunksize=1).get(timeout=300)
        for n, uri in enumerate((sqlite, server)):
            assert _check(uri, [results[n] for results in per_writer]) == WRITERS * STEPS * len(KEYS)
