"""Reading image files into one uint8 tensor, skipping (or refusing) the unreadable ones."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_SHOW_FIRST = 5


class ImageReadError(ValueError):
    """An image file could not be read (raised only with ``strict=True``)."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def parse_image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """None, an int (square) or (height, width) -> (height, width)."""
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif (isinstance(image_size, Sequence) and len(image_size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(
            f"image_size: expected an int or (height, width) of ints, got {image_size!r}"
        )
    if min(size) < 1:
        raise ValueError(f"image_size: expected positive sizes, got {image_size!r}")
    return size


def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.copy()


def _to_array(img: Image.Image, grayscale: bool, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if img.mode.startswith("I"):
        # 16/32-bit integer grayscale (16-bit PNGs): scale to 0..255 instead of clipping.
        arr = np.asarray(img).astype(np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    img = img.convert("L" if grayscale else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if grayscale else arr.transpose(2, 0, 1)


def read_images(paths: Sequence[Path], *, image_size: int | Sequence[int] | None = None,
                grayscale: bool | None = None, strict: bool = False,
                where: str = "") -> tuple[torch.Tensor, list[int]]:
    """Decode ``paths`` into one (N, C, H, W) uint8 tensor.

    Args:
        paths: image files.
        image_size: output (height, width) or an int; None uses the first readable
            image's size. Images of another size are resized (bilinear).
        grayscale: True -> 1 channel, False -> 3 (RGB); None decides from the first
            readable image (grayscale modes give 1 channel, anything else RGB).
        strict: raise :class:`ImageReadError` on the first unreadable file instead of
            skipping it with a warning.
        where: the folder/manifest being read, for messages.

    Returns:
        (images, kept) where ``kept`` are the positions in ``paths`` that were read.
    """
    size = parse_image_size(image_size)
    arrays: list[np.ndarray] = []
    kept: list[int] = []
    bad: list[tuple[Path, str]] = []
    for i, path in enumerate(paths):
        try:
            img = _open(path)
        except FileNotFoundError:
            reason = "file not found"
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                Image.DecompressionBombError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if grayscale is None:
                grayscale = img.mode in _GRAY_MODES
            if size is None:
                size = (img.height, img.width)
            arrays.append(_to_array(img, grayscale, size))
            kept.append(i)
            continue
        if strict:
            raise ImageReadError(
                f"{path}: cannot read this image ({reason}); fix or remove it, or pass "
                f"strict=False to skip unreadable images with a warning"
            )
        bad.append((path, reason))
    if bad:
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:_SHOW_FIRST])
        more = f"; and {len(bad) - _SHOW_FIRST} more" if len(bad) > _SHOW_FIRST else ""
        src = f" in {where}" if where else ""
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) of {len(paths)}{src}: {shown}{more}. "
            f"Pass strict=True to stop at the first one instead.",
            UserWarning,
            stacklevel=3,
        )
    if not arrays:
        src = f" in {where}" if where else ""
        raise ValueError(
            f"no readable images{src}: all {len(paths)} listed file(s) failed to decode "
            f"(first: {bad[0][0]} ({bad[0][1]}))" if bad else f"no images to read{src}"
        )
    images = torch.from_numpy(np.stack(arrays))
    return images, kept
