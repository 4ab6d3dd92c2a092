"""Inception-v3 feature network for FID, written out by hand (no torchvision, no downloads).

Architecture: Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision"
(Inception-v3, Fig. 5-7 and Table 1). Module names and shapes follow torchvision's
``inception_v3`` (``Conv2d_1a_3x3`` … ``Mixed_7c``, ``avgpool``, ``fc``) without the auxiliary
head, so a state dict saved from torchvision or from pytorch-fid loads unchanged.

With ``num_classes=1008`` the blocks are the pytorch-fid "FID" variants that reproduce the
TensorFlow graph used by Heusel et al. 2017 for FID (``pt_inception-2015-12-05`` weights):
average pools exclude padding in Mixed_5*/6b-e/7b, and Mixed_7c's pool branch is a max pool.
With any other class count (torchvision's 1000-class weights) the standard blocks are used.
Either way the network expects inputs in [-1, 1] at 299×299; ``forward`` resizes bilinearly
(``align_corners=False``, as pytorch-fid) and repeats a single channel to three.

This module never downloads: ``load_inception`` reads a file the user obtained themselves.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trainers.errors import CheckpointError, ConfigError, DataError

__all__ = ["InceptionFeatures", "build_inception", "load_inception", "FID_NUM_CLASSES"]

FID_NUM_CLASSES = 1008
INPUT_SIZE = 299
POOL_DIM = 2048


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm(eps=1e-3) → ReLU, torchvision's ``BasicConv2d``."""

    def __init__(self, in_ch: int, out_ch: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x: torch.Tensor, fid: bool) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    """35×35 block (Mixed_5b/5c/5d)."""

    def __init__(self, in_ch: int, pool_features: int, fid: bool) -> None:
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x, self.fid))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35→17 (Mixed_6a)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), b3, bp], 1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (Mixed_6b-6e)."""

    def __init__(self, in_ch: int, channels_7x7: int, fid: bool) -> None:
        super().__init__()
        self.fid = fid
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool(x, self.fid))
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17→8 (Mixed_7a)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8×8 block with expanded filter banks (Mixed_7b/7c).

    ``pool`` is ``"avg"`` (torchvision), ``"avg_nopad"`` (FID Mixed_7b) or ``"max"``
    (FID Mixed_7c, a quirk of the TensorFlow graph that pytorch-fid reproduces).
    """

    def __init__(self, in_ch: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool(x, fid=self.pool == "avg_nopad")
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionFeatures(nn.Module):
    """Inception-v3 trunk returning ``(pool_features[N, 2048], logits[N, num_classes])``.

    Input: images in [-1, 1], ``[N, 1 or 3, H, W]`` of any size; they are resized to 299×299.
    """

    def __init__(self, num_classes: int = FID_NUM_CLASSES) -> None:
        super().__init__()
        fid = num_classes == FID_NUM_CLASSES
        self.num_classes = num_classes
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32, fid=fid)
        self.Mixed_5c = InceptionA(256, pool_features=64, fid=fid)
        self.Mixed_5d = InceptionA(288, pool_features=64, fid=fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, fid=fid)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, fid=fid)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, fid=fid)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, fid=fid)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg_nopad" if fid else "avg")
        self.Mixed_7c = InceptionE(2048, pool="max" if fid else "avg")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(POOL_DIM, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(
                f"images: expected [N, 1 or 3, H, W] in [-1, 1], got shape {tuple(images.shape)}"
            )
        x = images.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        pool = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(self.dropout(pool))
        return pool, logits


def build_inception(num_classes: int = FID_NUM_CLASSES) -> InceptionFeatures:
    """A randomly initialised :class:`InceptionFeatures` in eval mode (for tests and loading)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"num_classes: must be a positive integer, got {num_classes!r}; "
            "use 1008 (FID weights) or 1000 (torchvision weights)"
        )
    return InceptionFeatures(num_classes).eval()


def _extract_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under ``state_dict``; drop ``module.`` prefixes
    and torchvision's auxiliary-classifier keys (``AuxLogits.*``), which FID does not use."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"Inception weights at {path}: not a state dict of tensors; "
            "pass the pt_inception-2015-12-05 .pth file (a state dict)"
        )
    out = {}
    for key, value in obj.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.startswith("AuxLogits."):
            out[key] = value
    return out


def _keys_message(path: str, missing: list[str], unexpected: list[str]) -> str:
    def head(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys: {head(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys: {head(unexpected)}")
    return (f"Inception weights at {path} do not match Inception-v3: {'; '.join(parts)}; "
            "pass the pytorch-fid pt_inception-2015-12-05 state dict")


def load_inception(path_or_file: str | os.PathLike[str],
                   device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load user-supplied Inception-v3 weights into :class:`InceptionFeatures` (eval, frozen).

    The file is read with ``torch.load(weights_only=True)``; the class count comes from
    ``fc.weight``. Raises DataError if the file is missing and CheckpointError if it cannot be
    read or its keys/shapes do not match the architecture.
    """
    path = os.fspath(path_or_file)
    if not os.path.isfile(path):
        raise DataError(
            f"Inception weights not found at {path}: download pt_inception-2015-12-05 weights "
            "yourself and pass --inception PATH"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have no common base class
        raise CheckpointError(
            f"Inception weights at {path} could not be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass a torch state dict file"
        ) from err
    state = _extract_state_dict(raw, path)
    fc_weight = state.get("fc.weight")
    num_classes = int(fc_weight.shape[0]) if fc_weight is not None else FID_NUM_CLASSES
    model = InceptionFeatures(num_classes)
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(_keys_message(path, missing, unexpected))
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).replace("\n", " ").replace("\t", " ")[:300]
        raise CheckpointError(
            f"Inception weights at {path} have wrong tensor shapes ({first}); "
            "pass the pytorch-fid pt_inception-2015-12-05 state dict"
        ) from err
    model.requires_grad_(False)
    return model.eval().to(device)
