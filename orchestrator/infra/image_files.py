"""Reading images for encoding: folder listing, mode conversion, ADM's center crop.

The crop is the recipe of ADM (Dhariwal & Nichol 2021) that DiT and the LDM papers train on: halve
the image with a box filter while its short side is at least twice the target, resize the short
side to the target with bicubic filtering, then cut the central square. Every image becomes RGB:
grayscale (L, I, F), palette (P) and CMYK images are converted, images with transparency (RGBA, LA,
P with a transparent colour) are composited on white. A file with an image suffix that cannot be
decoded is refused, naming the file; files without an image suffix are skipped and counted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "FolderListing", "list_image_folder", "center_crop_arr", "to_rgb", "load_image",
           "resize_uint8", "mode_summary"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class FolderListing:
    files: list[str]                   # absolute paths, sorted (class folders in name order)
    labels: list[int]                  # class index per file, or empty when unlabelled
    classes: list[str]
    skipped: list[str] = field(default_factory=list)   # non-image files left out


def list_image_folder(path: str) -> FolderListing:
    """Images in ``path`` (unlabelled) or in ``path/<class>/`` subfolders (labelled)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{path}: not a directory of images")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    entries = ([(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.is_file()]
               if classes else [(f, -1) for f in sorted(root.iterdir()) if f.is_file()])
    visible = [(f, i) for f, i in entries if not f.name.startswith(".")]
    images = [(f, i) for f, i in visible if f.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [str(f.relative_to(root)) for f, _ in visible if f.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return FolderListing([str(f.resolve()) for f, _ in images], [i for _, i in images] if classes else [],
                         classes, skipped)


def to_rgb(image):
    """A PIL image as RGB; transparency composited on white. Returns (image, original mode)."""
    from PIL import Image
    mode = image.mode
    if mode == "RGB":
        return image, mode
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), mode
    if image.mode in ("I", "I;16", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(arr.round().astype(np.uint8), "L")
    return image.convert("RGB"), mode


def center_crop_arr(image, resolution: int) -> np.ndarray:
    """ADM's crop: box-halve while the short side >= 2·resolution, bicubic to the short side =
    resolution, central square. PIL image -> uint8 [resolution, resolution, C]."""
    from PIL import Image
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top:top + resolution, left:left + resolution])


def load_image(path: str, resolution: int) -> tuple[np.ndarray, str]:
    """One file -> (uint8 [R, R, 3], its original mode); undecodable files are refused by name."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            rgb, mode = to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace the "
                        f"file and re-run (finished shards are kept)") from None
    return center_crop_arr(rgb, resolution), mode


def resize_uint8(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [N, H, W, C] (C = 1 or 3) -> uint8 [N, R, R, 3] through the same crop."""
    from PIL import Image
    if images.shape[1] == images.shape[2] == resolution and images.shape[-1] == 3:
        return images
    out = []
    for arr in images:
        im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        out.append(center_crop_arr(im.convert("RGB"), resolution))
    return np.stack(out)


def mode_summary(modes: Counter) -> str:
    """'converted 3 RGBA, 2 L images to RGB' or ''."""
    other = {m: n for m, n in modes.items() if m != "RGB"}
    if not other:
        return ""
    return "converted " + ", ".join(f"{n} {m}" for m, n in sorted(other.items())) + " image(s) to RGB"
