"""The training loop: exact resume for every method combination, learning, the NaN guard,
checkpoint contents and errors, sample-grid artifacts."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from tests.helpers import batches_for, init_for, methods_for, read_metrics, tiny_config
from trainers.checkpoint import load_state, save_state
from trainers.config import load_config
from trainers.ema import EMA
from trainers.errors import CheckpointError, TrainingDiverged
from trainers.loop import build_state, train
from trainers.methods import supported_combinations
from trainers.reporting import LocalReporter, checkpoint_dir_name, latest_checkpoint
from trainers.runtime import LocalRuntime


class _Preempted(Exception):
    pass


class _Wrapped:
    """A batch source around StepBatches that crashes, or poisons a batch, at one step."""

    def __init__(self, inner, crash_at: int | None = None, nan_at: int | None = None):
        self.inner, self.crash_at, self.nan_at = inner, crash_at, nan_at
        self.num_classes, self.image_size, self.channels = inner.num_classes, inner.image_size, inner.channels

    def get(self, step: int):
        if step == self.crash_at:
            raise _Preempted(f"worker lost before step {step}")
        x0, y = self.inner.get(step)
        if step == self.nan_at:
            x0 = torch.full_like(x0, float("nan"))
        return x0, y


def _run(cfg, run_dir: Path, batches=None, resume=None, init=None) -> dict:
    base_ref = {"uri": "memory://base", "sha256": "-"} if init is not None else None
    return train(cfg, LocalRuntime(), LocalReporter(run_dir, keep=10), batches or batches_for(cfg),
                 resume=resume, init=init, base_ref=base_ref)


def _ckpt(run_dir: Path, step: int) -> dict:
    return load_state(run_dir / checkpoint_dir_name(step))


def _assert_same_tree(a, b, path: str = "") -> None:
    """Bit-for-bit equality of nested checkpoint structures (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_same_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path                                               # NaN == NaN here
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# --------------------------------------------------------------------------------- resume
ADAPTIVE = {"curriculum": {"clusters": 4, "pacing": "adaptive", "patience": 1, "ema": 0.0}}
RESUME_CASES = [pytest.param(key, None, id="+".join(key) or "vanilla") for key in sorted(supported_combinations())]
RESUME_CASES += [pytest.param(key, ADAPTIVE, id="+".join(key) + "[adaptive]")
                 for key in sorted(supported_combinations()) if "curriculum" in key]
N_STEPS, RESUME_AT = 8, 3


@pytest.mark.parametrize("key, extra", RESUME_CASES)
def test_resume_equals_uninterrupted(tmp_path: Path, key: tuple[str, ...], extra) -> None:
    methods = methods_for(key)
    if extra:
        methods = {**methods, **extra}
    cfg = tiny_config(methods, train={"steps": N_STEPS, "checkpoint_every": RESUME_AT})
    init = init_for(cfg)                   # the base of a method that trains on a frozen backbone
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _run(cfg, straight, init=init)

    # The same run, preempted right after the checkpoint at RESUME_AT, then relaunched from it.
    with pytest.raises(_Preempted):
        _run(cfg, broken, _Wrapped(batches_for(cfg), crash_at=RESUME_AT), init=init)
    assert latest_checkpoint(broken).name == checkpoint_dir_name(RESUME_AT)
    resume = _ckpt(broken, RESUME_AT)
    assert resume["step"] == RESUME_AT
    summary = _run(cfg, broken, resume=resume, init=init)
    assert summary["step"] == N_STEPS

    a, b = _ckpt(straight, N_STEPS), _ckpt(broken, N_STEPS)
    for part in ("model", "ema", "optimizer", "plugins"):
        _assert_same_tree(a[part], b[part], part)
    ema_equal = all(torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])
    assert ema_equal == (init is not None)     # EMA really averages; a patch's parameters are followed
    start = _ckpt(straight, RESUME_AT)
    assert any(not torch.equal(start["model"][k], a["model"][k]) for k in a["model"])   # weights really moved

    # The relaunched steps log exactly the losses of the uninterrupted run.
    after = lambda rows: [(r["step"], r["loss"], r["mse"]) for r in rows if r["step"] > RESUME_AT]  # noqa: E731
    assert after(read_metrics(straight)) == after(read_metrics(broken))

    if "curriculum" in key:       # the curriculum moved both before and after the resume point
        stages = {r["step"]: r["curriculum/stage"] for r in read_metrics(straight)}
        assert 1 < stages[RESUME_AT] < stages[N_STEPS], stages
    if "ant-nash" in key:
        assert not torch.equal(a["plugins"]["combiner"]["alpha"], torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------- learning
def test_loss_decreases_on_digits(tmp_path: Path) -> None:
    cfg = tiny_config({}, train={"steps": 40, "batch_size": 16, "lr": 2e-3, "checkpoint_every": 1000})
    _run(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 41))
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    assert {"loss", "mse", "vb", "grad_norm", "lr", "steps_per_s", "interval/loss_0"} <= set(rows[-1])


def test_ema_update_rule() -> None:
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], 0.75 * before[name] + 0.25 * p.detach())
    assert not any(p.requires_grad for p in ema.model.parameters())


# ------------------------------------------------------------------------------- NaN guard
@pytest.mark.parametrize("methods", [{}, ADAPTIVE], ids=["vanilla", "curriculum-adaptive"])
def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path: Path, methods) -> None:
    cfg = tiny_config(methods, train={"steps": 10, "checkpoint_every": 2})
    with pytest.raises(TrainingDiverged) as err:
        _run(cfg, tmp_path, _Wrapped(batches_for(cfg), nan_at=4))
    msg = str(err.value)
    assert "loss became nan at step 5" in msg and "last good checkpoint (step 4)" in msg
    assert "train.lr" in msg                                              # names the fix
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [checkpoint_dir_name(2), checkpoint_dir_name(4)]
    good = load_state(latest_checkpoint(tmp_path))
    assert good["step"] == 4 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_the_first_bad_step_is_named_when_the_loss_is_read_later(tmp_path: Path) -> None:
    """The loss is read to the host only at logging/checkpoint steps: a NaN at step 5 is found at
    step 8, named as step 5, and nothing is stored after step 4."""
    cfg = tiny_config({}, train={"steps": 12, "checkpoint_every": 4, "log_every": 4})
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5; the last good checkpoint \(step 4\)"):
        _run(cfg, tmp_path, _Wrapped(batches_for(cfg), nan_at=4))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [checkpoint_dir_name(4)]


def test_absurd_learning_rate_diverges(tmp_path: Path) -> None:
    cfg = tiny_config({}, train={"steps": 20, "lr": 1e6, "checkpoint_every": 1})
    with pytest.raises(TrainingDiverged, match="loss became (nan|inf)"):
        _run(cfg, tmp_path)
    assert latest_checkpoint(tmp_path) is not None


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_contents(tmp_path: Path) -> None:
    key = ("ant-uw", "curriculum", "dtr")
    cfg = tiny_config(methods_for(key), train={"steps": 3, "checkpoint_every": 3})
    summary = _run(cfg, tmp_path)
    ckpt = _ckpt(tmp_path, 3)
    assert {"format", "step", "model", "ema", "optimizer", "scaler", "plugins", "config", "intervals",
            "model_spec", "plan"} <= set(ckpt)
    assert ckpt["step"] == 3
    assert load_config(ckpt["config"]) == cfg
    assert ckpt["intervals"] == [0, 25, 50, 75, 100]
    assert summary["intervals"] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert ckpt["plan"] == summary["plan"] == {
        "methods": "ant-uw+curriculum+dtr", "transforms": "dtr", "sampler": "ant-uw", "pacer": "curriculum",
        "weighter": "ant-uw", "combiner": "default"}
    assert set(ckpt["plugins"]) == {"sampler", "pacer", "weighter", "combiner"}
    assert ckpt["plugins"]["pacer"]["stage"] == 2                         # fixed pacing, 2 steps per stage
    assert ckpt["format"] == 2 and ckpt["model_spec"]["family"] == "DiT"
    assert not any(".inner." in k for k in ckpt["model"])                # DTR renames no backbone key
    log_vars = ckpt["plugins"]["weighter"]["log_vars"]
    assert log_vars.shape == (4,) and torch.count_nonzero(log_vars) > 0
    assert ckpt["model_spec"]["hidden"] == 64 and ckpt["model_spec"]["image_size"] == 8
    assert len(ckpt["optimizer"]["param_groups"]) == 2                     # model + UW log-variances


def test_keeps_newest_checkpoints(tmp_path: Path) -> None:
    cfg = tiny_config({}, train={"steps": 5, "checkpoint_every": 1})
    train(cfg, LocalRuntime(), LocalReporter(tmp_path, keep=2), batches_for(cfg))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [checkpoint_dir_name(4), checkpoint_dir_name(5)]


def test_corrupted_checkpoint_raises_checkpoint_error(tmp_path: Path) -> None:
    cfg = tiny_config({}, train={"steps": 1})
    _run(cfg, tmp_path / "run")
    path = tmp_path / "run" / checkpoint_dir_name(1) / "state.pt"
    data = path.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"\x00not a checkpoint" * 50)):
        (bad / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_state(bad / name)
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "missing")
    save_state(bad / "other", {"weights": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a denoiselab checkpoint"):
        load_state(bad / "other")


def test_checkpoint_from_a_different_model_is_refused(tmp_path: Path) -> None:
    small = tiny_config({}, train={"steps": 1})
    _run(small, tmp_path / "n")
    state = _ckpt(tmp_path / "n", 1)
    bigger = load_config(small.to_dict(), ["model.name=DiT-T/2", "train.steps=2"])
    with pytest.raises(CheckpointError, match="different model config.*hidden"):
        _run(bigger, tmp_path / "t", resume=state)
    with pytest.raises(CheckpointError, match="init_from"):
        _run(bigger, tmp_path / "t2", init=state)
    # Same geometry, other methods: resuming is refused (the run would continue with another
    # optimizer and plug-ins); starting a new run from its weights is what init_from is for.
    dtr = load_config(small.to_dict(), ["methods.dtr.active_ratio=0.5", "train.steps=2"])
    with pytest.raises(CheckpointError, match="written by methods vanilla, this run has dtr.*same methods"):
        _run(dtr, tmp_path / "d", resume=state)


@pytest.mark.parametrize("src_methods, dst_methods", [({}, {"dtr": {"active_ratio": 0.5}}),
                                                       ({"dtr": {"active_ratio": 0.5}}, {})])
def test_init_from_across_methods_loads_the_backbone_and_trains(tmp_path: Path, src_methods, dst_methods) -> None:
    """Staged loading: a vanilla checkpoint starts a DTR run and a DTR checkpoint a vanilla one."""
    src_cfg = tiny_config(src_methods, train={"steps": 2})
    _run(src_cfg, tmp_path / "src")
    src = _ckpt(tmp_path / "src", 2)
    cfg = tiny_config(dst_methods, train={"steps": 3})
    state = build_state(cfg, LocalRuntime(), batches_for(cfg), init=src)
    _assert_same_tree(src["ema"], state.raw_model.state_dict())            # same keys, EMA values
    summary = _run(cfg, tmp_path / "dst", init=src)
    assert summary["step"] == 3 and summary["plan"]["transforms"] == ("dtr" if dst_methods else "none")


def test_format_1_checkpoints_are_migrated(tmp_path: Path) -> None:
    """A checkpoint written before adapters (DTR keys ``blocks.N.inner.*``, the pacer inside the
    sampler state, no model family) resumes in the current code."""
    from trainers.checkpoint import migrate_state
    cfg = tiny_config(methods_for(("curriculum", "dtr")), train={"steps": 4, "checkpoint_every": 2})
    _run(cfg, tmp_path / "new")
    current = _ckpt(tmp_path / "new", 2)
    old = {**current, "format": 1, "plugins": {**current["plugins"], "sampler": {"pacer": current["plugins"]["pacer"]}},
           "model_spec": {k: v for k, v in current["model_spec"].items() if k != "family"}}
    del old["plugins"]["pacer"]
    for key in ("model", "ema"):
        old[key] = {re.sub(r"^(blocks\.\d+\.)", r"\1inner.", k): v for k, v in current[key].items()}
    assert any(".inner." in k for k in old["model"])
    save_state(tmp_path / "old" / checkpoint_dir_name(2), old)
    migrated = load_state(tmp_path / "old" / checkpoint_dir_name(2))
    _assert_same_tree(migrated, migrate_state(dict(current)))
    resumed = _run(cfg, tmp_path / "resumed", resume=migrated)
    assert resumed["step"] == 4


def test_init_from_loads_ema_weights_and_restarts(tmp_path: Path) -> None:
    cfg = tiny_config({}, train={"steps": 2})
    _run(cfg, tmp_path / "a")
    src = _ckpt(tmp_path / "a", 2)
    state = build_state(cfg, LocalRuntime(), batches_for(cfg), init=src)
    assert state.step == 0
    _assert_same_tree(src["ema"], state.raw_model.state_dict())


# ------------------------------------------------------------------------------ artifacts
def _png_size_and_pixels(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = body
        pos += 12 + length
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    return w, h, zlib.decompress(chunks[b"IDAT"])


def test_sample_grid_png_artifacts(tmp_path: Path) -> None:
    cfg = tiny_config({}, train={"steps": 2, "sample_every": 1}, sample={"n": 4, "steps": 3, "sampler": "ddpm"})
    _run(cfg, tmp_path)
    names = sorted(p.name for p in (tmp_path / "artifacts" / "samples").iterdir())
    assert names == ["final.png", "step_00000001.png", "step_00000002.png"]
    w, h, raw = _png_size_and_pixels((tmp_path / "artifacts" / "samples" / "final.png").read_bytes())
    cell = 8 * (64 // 8)                                  # 8x8 digits upscaled to 64 px, 2x2 grid, 1 px pad
    assert (w, h) == (2 * (cell + 1) + 1, 2 * (cell + 1) + 1)
    assert len(raw) == h * (1 + 3 * w)
    assert len(set(raw)) > 3                              # real samples, not a blank grid


def test_heldout_losses_are_scored_at_checkpoints_on_data_kept_out_of_training(tmp_path: Path) -> None:
    from trainers.data import training_batches
    from trainers.heldout import heldout_losses
    cfg = tiny_config({}, data={"holdout": 0.2}, train={"steps": 4, "checkpoint_every": 2})
    batches = training_batches(cfg)
    assert len(batches.data) + len(batches.heldout) == 1797 and len(batches.heldout) == 359
    train_rows = {r.numpy().tobytes() for r in batches.data.images}
    assert not any(r.numpy().tobytes() in train_rows for r in batches.heldout.images[:50])
    _run(cfg, tmp_path, batches)
    rows = [r for r in read_metrics(tmp_path) if "heldout/loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(set(r) >= {f"heldout/interval_{k}" for k in range(4)} for r in rows)
    state = build_state(cfg, LocalRuntime(), batches)
    again = [heldout_losses(state.ema.model, state.diffusion, state.intervals, batches.heldout, "cpu")
             for _ in range(2)]
    assert again[0] == again[1]                                   # same timesteps and noise every time
    with pytest.raises(Exception, match="data.holdout: only for the built-in sets"):
        load_config({"data": {"name": "parquet", "path": "/x", "holdout": 0.1}})
