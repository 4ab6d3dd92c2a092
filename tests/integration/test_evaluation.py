"""Evaluation at scale on real parts: seeds split across Ray tasks, outputs on disk and on a moto
S3 server, asynchronous evaluation during a Ray Train run logged to MLflow, ``denoiselab
evaluate`` into that run, and ``denoiselab review`` (table, JSON, --compare PNGs) against the
embedded sqlite store and a real ``mlflow server``."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli import main
from orchestrator.infra.data_io import read_dataset
from orchestrator.runs.driver import TrainRequest, run_training
from orchestrator.jobs.sampling import SampleSpec, sample_images, write_samples
from orchestrator.infra.storage import open_storage
from tests.helpers import ray_run_dict
from tests.integration.conftest import list_keys
from trainers.checkpoint import load_state
from trainers.config import load_config
from trainers.errors import CheckpointError

pytestmark = [pytest.mark.ray, pytest.mark.slow]

UW_CURRICULUM = {"ant": {"mtl": "uw"}, "curriculum": {"clusters": 4, "pacing": "fixed", "stage_steps": 3}}


@pytest.fixture(scope="module", autouse=True)
def eval_cache(tmp_path_factory):
    """Feature nets and reference statistics: ``$DENOISELAB_CACHE`` when the caller sets one (the
    cache is keyed by content, so reuse is safe), else a fresh directory. Set before Ray starts so
    every worker sees it."""
    previous = os.environ.get("DENOISELAB_CACHE")
    os.environ["DENOISELAB_CACHE"] = previous or str(tmp_path_factory.mktemp("denoiselab-cache"))
    yield os.environ["DENOISELAB_CACHE"]
    if previous is None:
        os.environ.pop("DENOISELAB_CACHE", None)


@pytest.fixture(scope="module")
def eval_run(local_ray, tmp_path_factory):
    """A real Ray Train run (ANT-UW + curriculum) with evaluation every 10 steps, n=64."""
    root = tmp_path_factory.mktemp("eval-run")
    cfg = load_config(ray_run_dict(name="eval-run", methods=UW_CURRICULUM, eval={"every": 10, "n": 64, "steps": 4},
                                  storage={"path": str(root / "runs")},
                                  tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "eval"}))
    out = run_training(TrainRequest(cfg, quiet=True))
    return {"out": out, "root": root, "runs": str(root / "runs"), "uri": out.tracking_uri}


def test_seeds_split_across_two_workers(eval_run, s3, tmp_path):
    state = load_state(os.path.join(eval_run["runs"], "eval-run", "step_00000020"))
    spec = SampleSpec(n=150, steps=3, block=32)          # 5 blocks, the last one partial
    two = sample_images(state, spec, workers=2)
    assert two.meta["tasks"] == 2
    assert sorted(two.indices.tolist()) == list(range(150)) == two.indices.tolist()
    one = sample_images(state, spec, workers=1)
    assert np.array_equal(one.images, two.images), "samples must not depend on how seeds are split"
    assert two.images.shape == (150, 8, 8, 1) and two.images.dtype == np.uint8
    assert two.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert len({two.images[i].tobytes() for i in range(150)}) > 140          # distinct seeds, distinct images
    paths = write_samples(two, str(tmp_path / "out"), shard_size=64)
    with np.load(paths["npz"]) as npz:
        assert npz["arr_0"].shape == (150, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
        assert np.array_equal(npz["arr_0"][..., 0], two.images[..., 0]) and npz["arr_1"].tolist() == two.labels.tolist()
    back = read_dataset(open_storage(str(tmp_path / "out")), "parquet")
    assert len(back) == 150 and back.num_classes == 10
    assert np.array_equal(((back.images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), two.images)
    with Image.open(paths["grid"]) as im:
        assert im.size[0] > 100 and np.asarray(im).std() > 0
    remote = write_samples(two, "s3://denoiselab/samples/eval-run", endpoint=s3["endpoint"])
    keys = list_keys(s3, "samples/eval-run/")
    assert {"samples/eval-run/samples.npz", "samples/eval-run/grid.png", "samples/eval-run/parquet/_denoiselab.json",
            "samples/eval-run/parquet/part-00000.parquet"} <= set(keys)
    assert remote["npz"] == "s3://denoiselab/samples/eval-run/samples.npz"


def test_sample_command(eval_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["sample", "eval-run", "--n", "70", "--steps", "2", "--workers", "2", "--storage", eval_run["runs"],
                 "--out", str(out)]) == 0
    assert "wrote 70 samples" in capsys.readouterr().out
    meta = json.loads((out / "samples.json").read_text())
    assert meta["n"] == 70 and meta["tasks"] == 2 and meta["steps"] == 2 and meta["weights"] == "ema"
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (70, 8, 8, 3)
    assert main(["sample", "eval-run", "--n", "8", "--steps", "2", "--storage", eval_run["runs"],
                 "--out", str(tmp_path / "grid.png")]) == 0                 # tiny: in process, grid only
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[0] > 64


def test_training_evaluates_checkpoints_asynchronously(eval_run):
    out, client = eval_run["out"], MlflowClient(eval_run["uri"])
    history = sorted(client.get_metric_history(out.run_id, "fd_digits"), key=lambda m: m.step)
    assert [m.step for m in history] == [10, 20]
    assert all(np.isfinite(m.value) and m.value > 0 for m in history)
    for key in ("precision_digits", "recall_digits"):
        assert [m.step for m in client.get_metric_history(out.run_id, key)] == [10, 20]
    tags = client.get_run(out.run_id).data.tags
    record = json.loads(tags["eval.step_00000020_n64"])
    assert record["checkpoint"].endswith("eval-run/step_00000020") and record["source"] == "training"
    assert record["extractors"] == ["digits"] and record["sampling"]["steps"] == 4
    assert not [k for k in tags if k.startswith("eval.error")]
    on_disk = json.loads(open(os.path.join(eval_run["runs"], "eval-run", "denoiselab", "eval",
                                           "step_00000010_n64.json")).read())
    assert on_disk["metrics"]["fd_digits"] == pytest.approx(history[0].value)
    assert out.metrics["fd_digits"] == pytest.approx(history[-1].value)          # the driver's summary


def test_evaluate_command_logs_into_the_run(eval_run, capsys):
    code = main(["evaluate", "eval-run", "--n", "80", "--steps", "3", "--workers", "2", "--storage", eval_run["runs"],
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mlflow_run_id"] == eval_run["out"].run_id and result["step"] == 20 and result["n"] == 80
    client = MlflowClient(eval_run["uri"])
    points = [(m.step, m.value) for m in client.get_metric_history(eval_run["out"].run_id, "fd_digits")]
    assert (20, pytest.approx(result["metrics"]["fd_digits"])) in points and len(points) == 3
    assert json.loads(client.get_run(eval_run["out"].run_id).data.tags["eval.step_00000020_n80"])["n"] == 80
    assert main(["evaluate", "eval-run", "--n", "80", "--local", "--storage", eval_run["runs"],
                 "--inception", "/nonexistent/pt_inception.pth"]) == 2
    assert "--inception" in capsys.readouterr().err


def _check_png(path: str, min_width: int = 300) -> None:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB")).astype(float)
        assert im.size[0] >= min_width and im.size[1] >= 200, (path, im.size)
    assert arr.std() > 5 and (arr < 200).mean() > 0.01, f"{path} looks blank"


def test_review_table_json_and_compare(eval_run, tmp_path, capsys):
    uri = eval_run["uri"]
    assert main(["review", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert "eval-run" in table and "ant-uw+curriculum" in table and "fd_digits=" in table and "20/20" in table
    assert main(["review", "--tracking-uri", uri, "--experiment", "eval", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["run_name"] == "eval-run")
    assert row["steps"] == 20 and row["plan"] == "ant-uw+curriculum" and row["images_per_s"] > 0
    assert row["best_eval"]["metric"] == "fd_digits" and row["checkpoint"].endswith("eval-run/step_00000020")
    out_dir = tmp_path / "plots"
    assert main(["review", "--tracking-uri", uri, "--compare", "eval-run", "--out", str(out_dir),
                 "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"loss", "metrics", "interval_loss", "curriculum", "uw_weights", "samples"} <= set(result["plots"])
    for path in result["plots"].values():
        _check_png(path)
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(eval_run["out"].run_id, "review")}
    assert "review/interval_loss.png" in artifacts and "review/loss.png" in artifacts
    assert main(["review", "--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err


def test_review_against_mlflow_server(local_ray, s3, mlflow_server, tmp_path, capsys):
    cfg = load_config(ray_run_dict(name="review-server", train={"steps": 10, "checkpoint_every": 10},
                                  storage={"path": str(tmp_path / "runs")},
                                  tracking={"uri": mlflow_server, "experiment": "review-server"}))
    run_training(TrainRequest(cfg, quiet=True))
    capsys.readouterr()                                  # MLflow's own "View run at" lines
    assert main(["review", "--tracking-uri", mlflow_server, "--experiment", "review-server", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_name"] for r in rows] == ["review-server"] and rows[0]["steps"] == 10
    assert main(["review", "--tracking-uri", mlflow_server, "--compare", "review-server", "--out",
                 str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "review-server" in printed and "loss.png" in printed
    _check_png(str(tmp_path / "plots" / "loss.png"))
    assert any(k.endswith("review/loss.png") for k in list_keys(s3, "mlflow-artifacts/"))


def test_dmp_patch_of_a_run_on_two_workers_samples_evaluates_and_reviews(eval_run, tmp_path, capsys):
    """DMP end to end: a 2-worker Ray Train patch of ``eval-run`` (frozen backbone, prompts and gate
    trained), checkpoints referencing the base by URI + SHA-256, then sample, evaluate and review
    through the CLI; a changed base is refused by every reader; a schedule mismatch before Ray."""
    import hashlib
    runs, uri = eval_run["runs"], eval_run["uri"]
    base_file = os.path.join(runs, "eval-run", "step_00000020", "state.pt")
    patch = ray_run_dict(name="eval-dmp", init_from="eval-run", methods={"dmp": {"lr": 1e-2}},
                         train={"steps": 6, "checkpoint_every": 3, "log_every": 3}, scaling={"num_workers": 2},
                         eval={"n": 32, "steps": 2},
                         storage={"path": runs}, tracking={"uri": uri, "experiment": "eval"})
    out = run_training(TrainRequest(load_config(patch), quiet=True))
    client = MlflowClient(uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.params["plan.backbone"] == "frozen"
    assert int(run.data.params["cost.added_params"]) > 0
    assert int(run.data.params["cost.trainable_params"]) == int(run.data.params["cost.added_params"])
    assert out.metrics["fd_digits"] > 0                     # in-training evaluation of the patch (with its base)
    assert not [k for k in run.data.tags if k.startswith("eval.error")]
    assert client.get_metric_history(out.run_id, "dmp/importance_cv2")
    artifacts = {a.path for a in client.list_artifacts(out.run_id, "summaries")} | \
        {a.path for a in client.list_artifacts(out.run_id, "plots")}
    assert {"summaries/dmp_gate_usage.json", "plots/dmp_gate_usage.png"} <= artifacts
    ckpt = load_state(os.path.join(runs, "eval-dmp", "step_00000006"))
    assert set(ckpt["model"]) == {"adapters.dmp.prompts", "adapters.dmp.gate.weight", "adapters.dmp.gate.bias",
                                  "adapters.dmp.noise.weight"}                   # no copy of the backbone
    with open(base_file, "rb") as fh:
        assert ckpt["base"]["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert ckpt["base"]["uri"] == base_file

    assert main(["sample", "eval-dmp", "--n", "8", "--steps", "2", "--storage", runs,
                 "--out", str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as im:
        assert np.asarray(im).std() > 0
    assert main(["evaluate", "eval-dmp", "--n", "40", "--steps", "2", "--local", "--storage", runs, "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mlflow_run_id"] == out.run_id and record["metrics"]["fd_digits"] > 0
    assert main(["review", "--tracking-uri", uri, "--compare", "eval-dmp", "--out", str(tmp_path / "plots"),
                 "--no-log"]) == 0
    _check_png(str(tmp_path / "plots" / "dmp_gate_usage.png"))

    original = open(base_file, "rb").read()
    try:
        with open(base_file, "ab") as fh:
            fh.write(b"\0")                                   # the base changed after it was patched
        capsys.readouterr()
        assert main(["sample", "eval-dmp", "--n", "4", "--steps", "2", "--storage", runs,
                     "--out", str(tmp_path / "g2.png")]) == 2
        assert "has changed since the patch was trained" in capsys.readouterr().err
    finally:
        with open(base_file, "wb") as fh:
            fh.write(original)
    bad = load_config({**patch, "name": "eval-dmp-cosine", "diffusion": {"steps": 100, "schedule": "cosine"}})
    with pytest.raises(CheckpointError, match="diffusion.schedule: the base checkpoint .* 'linear', this run has 'cosine'"):
        run_training(TrainRequest(bad, quiet=True))
