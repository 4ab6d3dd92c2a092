"""The autoencoder of latent datasets: diffusers' ``AutoencoderKL`` (Rombach et al. 2022, §3).

A latent diffusion model learns z = (E(x) − shift) · scale, where E(x) is the posterior of the
autoencoder (a diagonal Gaussian: mean and std per latent element) and ``scale`` brings the latents
to roughly unit variance (0.18215 for the Stable Diffusion VAE, LDM §4.3.2). Images come back as
D(z / scale + shift).

Weights are never downloaded. An encoder is either

* a directory in the diffusers layout: ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (or ``.bin``), what ``AutoencoderKL.save_pretrained`` writes; or
* one weights file (``.safetensors``, ``.bin``, ``.pt``, ``.ckpt``) with a ``config.json`` beside it;
  keys in the diffusers layout or in the original LDM layout (converted by diffusers).

Its identity is the SHA-256 of those files (:func:`encoder_sha256`); a latent dataset's manifest
records it, and every later use (training grids, sampling, evaluation) checks it before decoding.
Workers never read the encoder from disk: an :class:`EncoderPayload` (config + weights) travels
through Ray's object store, so nodes need no shared file system.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainers.errors import ConfigError, DataError

__all__ = ["EncoderPayload", "encoder_files", "encoder_sha256", "load_payload", "build_autoencoder",
           "init_encoder", "encode_uint8", "decode_latents", "WEIGHT_NAMES"]

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def encoder_files(path: str) -> tuple[Path, Path]:
    """(config.json, weights file) of an encoder directory or single file; one-line errors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--encoder: {path} does not exist; pass a diffusers AutoencoderKL directory "
                        f"(config.json + {WEIGHT_NAMES[0]}) or create one with `denoiselab data init-encoder`")
    if p.is_dir():
        config = p / "config.json"
        weights = next((p / n for n in WEIGHT_NAMES if (p / n).is_file()), None)
        if not config.is_file() or weights is None:
            found = ", ".join(sorted(f.name for f in p.iterdir())[:6]) or "nothing"
            raise DataError(f"--encoder: {path} is not a diffusers AutoencoderKL directory (needs config.json and "
                            f"{' or '.join(WEIGHT_NAMES)}; found {found})")
        return config, weights
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise DataError(f"--encoder: {path} is not a weights file ({', '.join(WEIGHT_SUFFIXES)}) or a directory")
    config = p.parent / "config.json"
    if not config.is_file():
        raise DataError(f"--encoder: a single weights file needs its AutoencoderKL config.json beside it "
                        f"({config} is missing)")
    return config, p


def encoder_sha256(path: str) -> str:
    """SHA-256 over the encoder's config and weights (names excluded, so a copy hashes the same)."""
    digest = hashlib.sha256()
    for f in encoder_files(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EncoderPayload:
    """Everything a worker needs to rebuild the autoencoder: no file access on the worker."""
    config: dict
    weights: dict = field(repr=False)
    sha256: str = ""
    path: str = ""

    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor") or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(self.config.get("shift_factor") or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("latent_channels", 4))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.get("block_out_channels", (64,))) - 1)


def _read_weights(weights: Path) -> dict:
    """Tensors only: safetensors, or ``torch.load(weights_only=True)`` (no pickled code runs)."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(weights))
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling and format errors share no base class
        raise DataError(f"encoder weights {weights}: cannot be read as tensors ({type(err).__name__}); give "
                        f"safetensors or a plain state dict (pickled objects are refused)") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _convert_layout(config: dict, weights: Path) -> dict:
    """Original LDM key layout -> diffusers layout, through diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    return convert_ldm_vae_checkpoint(_read_weights(weights), config)


def load_payload(path: str, expected_sha256: Optional[str] = None, *, what: str = "--encoder") -> EncoderPayload:
    """Read an encoder from disk (hash-checked against ``expected_sha256`` when given)."""
    config_file, weights_file = encoder_files(path)
    sha = encoder_sha256(path)
    if expected_sha256 and sha != expected_sha256:
        raise DataError(f"{what}: {path} has sha256 {sha[:12]}… but the dataset was encoded with "
                        f"{expected_sha256[:12]}…; point it at the encoder the dataset was prepared with")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise DataError(f"{what}: {config_file} is not valid JSON ({err})") from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise DataError(f"{what}: {config_file} describes a {config['_class_name']}, not an AutoencoderKL")
    weights = _read_weights(weights_file)
    model = _instantiate(config, what)
    if not set(model.state_dict()) <= set(weights):
        try:
            weights = _convert_layout(config, weights_file)
        except Exception:                                                 # noqa: BLE001 - reported below
            pass
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise DataError(f"{what}: {weights_file.name} does not match its config.json ({len(missing)} missing "
                        f"keys, e.g. {missing[0]}); is it an AutoencoderKL of this configuration?")
    weights = {k: v for k, v in weights.items() if k in model.state_dict()}
    return EncoderPayload(config, weights, sha, str(Path(path).expanduser().resolve()))


def _instantiate(config: dict, what: str = "encoder"):
    from diffusers import AutoencoderKL
    try:
        return AutoencoderKL.from_config(config)
    except (TypeError, ValueError) as err:
        raise DataError(f"{what}: its config.json does not build an AutoencoderKL ({err})") from None


_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def build_autoencoder(payload: EncoderPayload, device: str = "cpu"):
    """The ``AutoencoderKL`` of a payload (cached per process, eval mode, fp32)."""
    key = (payload.sha256, str(device))
    if key not in _CACHE:
        model = _instantiate(payload.config)
        model.load_state_dict(payload.weights)
        _CACHE.clear()
        _CACHE[key] = model.to(device).eval().requires_grad_(False)
    return _CACHE[key]


@torch.no_grad()
def encode_uint8(model, images: np.ndarray, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, H, W, 3] -> posterior (mean, std), each [N, C, h, w] float32 on the CPU (unscaled)."""
    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    dist = model.encode(x.to(device)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


@torch.no_grad()
def decode_latents(payload: EncoderPayload, z: torch.Tensor, scale: float, shift: float = 0.0,
                   batch: int = 64) -> torch.Tensor:
    """Model-space latents z -> images in [-1, 1] on the CPU: D(z / scale + shift)."""
    device = z.device
    model = build_autoencoder(payload, str(device))
    out = [model.decode(chunk / scale + shift).sample.float().clamp(-1, 1).cpu() for chunk in z.split(batch)]
    return torch.cat(out) if out else z.new_zeros((0, model.config.out_channels, 0, 0)).cpu()


def init_encoder(out: str, *, latent_channels: int = 4, channels: tuple[int, ...] = (32, 64),
                 layers_per_block: int = 1, seed: int = 0, scaling_factor: float = 1.0) -> str:
    """A small randomly initialised ``AutoencoderKL`` saved in the diffusers layout (for trying
    the latent path on a CPU; it does not reconstruct images). The posterior's log-variance is set
    to −6 (std ≈ 0.05) so its latents are a random projection of the image, not noise. Returns its
    SHA-256."""
    from diffusers import AutoencoderKL
    if not channels or any(c < 8 or c % 8 for c in channels):
        raise ConfigError(f"--channels: each stage width must be a positive multiple of 8, got {channels}")
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise DataError(f"--out: {out} exists and is not empty; choose a new directory")
    torch.manual_seed(seed)
    n = len(channels)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                          up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels),
                          layers_per_block=layers_per_block, latent_channels=latent_channels,
                          norm_num_groups=8, scaling_factor=scaling_factor)
    with torch.no_grad():                  # a tight posterior (std ≈ 0.05), so latents carry the image
        model.quant_conv.weight[latent_channels:].zero_()
        model.quant_conv.bias[latent_channels:].fill_(-6.0)
    model.save_pretrained(str(target), safe_serialization=True)
    return encoder_sha256(str(target))
