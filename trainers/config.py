"""The run configuration: one frozen dataclass per section, loaded strictly.

A run config is a plain mapping (usually YAML, see ``orchestrator/experiments/*.yaml``)::

    model: {name: DiT-T/2}
    diffusion: {schedule: linear, steps: 1000}
    intervals: {rule: uniform, count: 8}
    methods: {dtr: {active_ratio: 0.8, alpha: 4.0}, ant: {mtl: uw}}
    train: {steps: 400000, batch_size: 256}

Method sections live next to their code (``trainers/methods/*``); this module binds them.
"""
from __future__ import annotations

import dataclasses
import re
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from trainers.configlib import apply_overrides, from_dict, to_dict
from trainers.errors import ConfigError
from trainers.methods.config import MethodsConfig

__all__ = [
    "RunConfig", "ModelConfig", "DiffusionConfig", "DataConfig", "IntervalsConfig", "LossConfig",
    "TrainConfig", "SampleConfig", "EvalConfig", "ScalingConfig", "StorageConfig",
    "TrackingConfig", "load_config", "run_name_for",
]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "DiT-T/2"          # DiT-{N,T,S,B,L,XL}/{2,4,8}; N and T are CPU-sized
    class_dropout: float = 0.1     # label dropout for classifier-free guidance
    arch: dict[str, Any] = field(default_factory=dict)   # family options, e.g. DiT {depth: 6, hidden_size: 96}

    def __post_init__(self) -> None:
        from trainers.models.registry import model_options
        model_options(self.name, self.arch)          # the family exists and its options are valid
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError("model.class_dropout: must be in [0, 1)")


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: Literal["linear", "cosine"] = "linear"
    steps: int = 1000
    learn_sigma: bool = True       # DiT convention: learned variance, loss = mse + vb

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ConfigError("diffusion.steps: need at least 2 timesteps")


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "shapes", "parquet", "latents"] = "digits"
    path: Optional[str] = None     # parquet / latents: local directory or s3://bucket/prefix
    image_size: int = 16           # shapes only (digits are 8x8; parquet and latents are read as stored)
    num_classes: int = 4           # shapes only
    num_samples: int = 4096        # shapes only
    seed: int = 0
    flip: bool = False             # random horizontal flip (latents: the stored flipped latent, if encoded)
    conditional: bool = True       # use class labels when the dataset has them
    holdout: float = 0.0           # built-in sets: share kept out of training for held-out losses
    encoder: Optional[str] = None  # latents: the autoencoder, if not where the manifest says (hash-checked)

    def __post_init__(self) -> None:
        if self.stored and not self.path:
            raise ConfigError(f"data.path: required when data.name is {self.name} (a directory or s3:// URI)")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError("data.holdout: must be in [0, 1) (a share of the set, e.g. 0.1)")
        if self.holdout > 0 and self.stored:
            raise ConfigError(f"data.holdout: only for the built-in sets; hold out part of a {self.name} set "
                              f"when you prepare it")
        if self.encoder and self.name != "latents":
            raise ConfigError("data.encoder: only for data.name=latents")
        if self.image_size < 4:
            raise ConfigError("data.image_size: must be at least 4")

    @property
    def stored(self) -> bool:
        """Read from prepared files (Parquet shards and a manifest), not generated."""
        return self.name in ("parquet", "latents")

    @property
    def pixels(self) -> bool:
        """Pixel data in [-1, 1]; latents are not bounded (no clamp when sampling)."""
        return self.name != "latents"


@dataclass(frozen=True)
class IntervalsConfig:
    """The timestep partition shared by ANT and MEME (docs/architecture.md, "intervals")."""
    rule: Literal["uniform", "timestep", "snr", "log-snr", "affinity", "explicit"] = "uniform"
    count: int = 5
    min_width: int = 1
    pairs: Optional[tuple[tuple[int, int], ...]] = None   # explicit: [[lo, hi), ...]
    artifact: Optional[str] = None                        # affinity: path/URI of a TAS artifact

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError("intervals.count: must be >= 1")
        if self.rule == "explicit" and not self.pairs:
            raise ConfigError("intervals.pairs: required for rule explicit, e.g. [[0, 500], [500, 1000]]")
        if self.rule == "affinity" and not self.artifact:
            raise ConfigError("intervals.artifact: required for rule affinity; make one with `denoiselab affinity`")


@dataclass(frozen=True)
class LossConfig:
    weighting: Literal["constant", "min_snr", "p2"] = "constant"
    gamma: float = 5.0             # Min-SNR-γ (Hang et al. 2023; typical 5)
    p2_gamma: float = 1.0          # P2 exponent γ (Choi et al. 2022: 1)
    p2_k: float = 1.0              # P2 offset k (Choi et al. 2022: 1)

    def __post_init__(self) -> None:
        if self.gamma <= 0:
            raise ConfigError("loss.gamma: must be > 0 (Min-SNR-γ; typical: 5)")
        if self.p2_gamma < 0 or self.p2_k <= 0:
            raise ConfigError("loss.p2_gamma/p2_k: P2 needs p2_gamma >= 0 and p2_k > 0 (paper: 1, 1)")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64           # global batch, split evenly across workers
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 0.0         # 0 disables
    ema_decay: float = 0.9999
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # autocast only on CUDA
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    sample_every: int = 0          # 0 = only at the end
    compile: bool = False
    adamw: Literal["auto", "fused", "foreach", "loop"] = "auto"   # auto: fused on CUDA, foreach elsewhere

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr: must be > 0")
        for name in ("weight_decay", "grad_clip", "sample_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0 (0 disables)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("train.ema_decay: must be in [0, 1)")


@dataclass(frozen=True)
class SampleConfig:
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int = 50
    guidance: float = 1.0          # classifier-free guidance scale; 1 disables
    n: int = 64
    eta: float = 0.0
    clip_x0: Optional[bool] = None # clamp predicted x0 to [-1, 1]; null: on for pixel data, off for latents

    def __post_init__(self) -> None:
        if self.steps < 1 or self.n < 0:
            raise ConfigError("sample.steps/n: steps must be >= 1 and n >= 0 (0 disables the grid)")
        if self.eta < 0 or self.guidance < 0:
            raise ConfigError("sample.eta/guidance: must be >= 0 (guidance 1 disables CFG)")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0                 # 0 = only at the end (when n > 0)
    n: int = 0                     # samples per evaluation; 0 disables
    steps: int = 50

    def __post_init__(self) -> None:
        if self.every < 0 or self.n < 0 or self.steps < 1:
            raise ConfigError("eval.every/n/steps: every and n must be >= 0, steps >= 1")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("scaling.num_workers: must be >= 1")


_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s]*:[^/@\s]*@")


def check_no_password(uri: Optional[str], field_name: str) -> None:
    """A password inside a URI would be copied into params, logs and Ray's records: refused."""
    if isinstance(uri, str) and _USERINFO.match(uri):
        raise ConfigError(f"{field_name}: contains a user:password; remove it and set MLFLOW_TRACKING_USERNAME / "
                          f"MLFLOW_TRACKING_PASSWORD (or AWS credentials) in the environment instead")


@dataclass(frozen=True)
class StorageConfig:
    path: str = "./runs"           # local directory or s3://bucket/prefix
    endpoint: Optional[str] = None # S3-compatible endpoint, e.g. http://127.0.0.1:9000
    region: Optional[str] = None
    retry_seconds: float = 900.0   # an unreachable store: checkpoint uploads retry this long (training goes on)

    def __post_init__(self) -> None:
        if not self.retry_seconds >= 0:
            raise ConfigError("storage.retry_seconds: must be >= 0 (seconds a checkpoint upload keeps retrying)")
        check_no_password(self.endpoint, "storage.endpoint")


@dataclass(frozen=True)
class TrackingConfig:
    uri: Optional[str] = None      # default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "denoiselab"
    system_metrics: bool = False
    retry_seconds: float = 300.0   # an unreachable server: metrics wait in memory this long, then go to the spool

    def __post_init__(self) -> None:
        if not self.retry_seconds >= 0:
            raise ConfigError("tracking.retry_seconds: must be >= 0 (seconds metrics wait for the server "
                              "before they are spooled to storage)")
        check_no_password(self.uri, "tracking.uri")


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")     # one path component: no '/', no '..' start


@dataclass(frozen=True)
class RunConfig:
    name: Optional[str] = None     # default: derived deterministically from the config
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    intervals: IntervalsConfig = field(default_factory=IntervalsConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    init_from: Optional[str] = None   # start a NEW run from this checkpoint's weights

    def __post_init__(self) -> None:
        if self.name is not None and not RUN_NAME.match(self.name):
            raise ConfigError(f"name: {self.name!r} must be 1-128 letters, digits, '_', '-', '+' or '.', starting with a "
                              f"letter or digit (it names a directory under storage.path)")
        if self.train.batch_size % self.scaling.num_workers:
            raise ConfigError(
                f"train.batch_size: {self.train.batch_size} is not divisible by "
                f"scaling.num_workers={self.scaling.num_workers}; pick a multiple")
        if self.intervals.count > self.diffusion.steps:
            raise ConfigError(
                f"intervals.count: {self.intervals.count} intervals cannot partition "
                f"{self.diffusion.steps} timesteps; use at most diffusion.steps")

    @property
    def local_batch_size(self) -> int:
        return self.train.batch_size // self.scaling.num_workers

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def clip_x0(self) -> bool:
        """Whether sampling clamps x0 to [-1, 1]: ``sample.clip_x0``, else by the data."""
        return self.data.pixels if self.sample.clip_x0 is None else self.sample.clip_x0

    def replace(self, **sections) -> "RunConfig":
        return dataclasses.replace(self, **sections)


def load_config(data: dict | None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Raw mapping (+ dotted overrides) -> validated :class:`RunConfig`."""
    data = dict(data or {})
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(RunConfig, data)


def run_name_for(cfg: RunConfig) -> str:
    """Deterministic run name: the explicit ``name``, else a hash of the training-relevant config.

    Sections that do not change what is trained (tracking, storage, scaling resources) are
    left out, so the same experiment relaunched elsewhere resumes under the same name.
    """
    if cfg.name:
        return cfg.name
    payload = cfg.to_dict()
    for key in ("name", "tracking", "storage", "sample", "eval"):
        payload.pop(key, None)
    for key in ("cpus_per_worker", "resources_per_worker", "placement_strategy", "max_failures"):
        payload["scaling"].pop(key, None)         # where it runs, not what it trains
    digest = hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
    model = cfg.model.name.replace("/", "").lower()
    return f"{cfg.data.name}-{model}-{digest}"
