"""A picture of positive pairs, so a person can see what the pipeline calls "the same"."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nearfar.views.base import as_float_batch


def _to_uint8_hwc(x: Tensor) -> np.ndarray:
    """(B, C, H, W) float [0, 1] -> (B, H, W, 3) uint8 (1-channel repeated)."""
    x = x.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :3] if x.shape[1] > 3 else x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1) * 255.0).round().to(torch.uint8).numpy()


def save_pair_grid(images_1: Tensor, images_2: Tensor, path: str | Path, *, nrow: int = 8,
                   max_pairs: int = 64, min_cell: int = 64) -> Path:
    """Save a PNG of positive pairs: each cell shows view 1 and view 2 side by side.

    Args:
        images_1, images_2: (B, C, H, W) batches (float in [0, 1] or uint8); row i of
            each is one pair. Images of different sizes are each scaled to the larger.
        path: output ``.png`` (parent folders are created).
        nrow: pairs per grid row.
        max_pairs: show at most this many pairs (the first ones).
        min_cell: small images are enlarged (nearest neighbour, integer factor) until
            each is at least this many pixels tall.

    Returns:
        The path written.
    """
    a = as_float_batch(images_1, "images_1")
    b = as_float_batch(images_2, "images_2")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"images_2: expected {a.shape[0]} images like images_1 (one per pair), got "
            f"{b.shape[0]}"
        )
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow: expected an integer >= 1, got {nrow!r}")
    n = min(a.shape[0], max_pairs)
    if n == 0:
        raise ValueError("images_1: expected at least one pair, got an empty batch")
    h = max(a.shape[2], b.shape[2])
    w = max(a.shape[3], b.shape[3])
    scale = max(1, math.ceil(min_cell / h))
    ch, cw = h * scale, w * scale
    inner, outer = max(1, scale // 2), 4 * max(1, scale // 2) + 2  # gap in a pair / between
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    width = cols * (2 * cw + inner) + (cols + 1) * outer
    height = rows * ch + (rows + 1) * outer
    canvas = Image.new("RGB", (width, height), (128, 128, 128))
    left, right = _to_uint8_hwc(a[:n]), _to_uint8_hwc(b[:n])
    for i in range(n):
        r, c = divmod(i, cols)
        y = outer + r * (ch + outer)
        x = outer + c * (2 * cw + inner + outer)
        for k, arr in enumerate((left[i], right[i])):
            tile = Image.fromarray(arr).resize((cw, ch), Image.Resampling.NEAREST)
            canvas.paste(tile, (x + k * (cw + inner), y))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out
