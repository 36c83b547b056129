"""Corrupted copies of images for the out-of-domain audit (in the spirit of the common
corruptions of Hendrycks and Dietterich, 2019), each at one fixed severity."""

from __future__ import annotations

import torch

from nearfar.audit.groups import AuditError

#: corruptions for the out-of-domain audit: name -> what it does
SHIFTS = {
    "noise": "additive Gaussian pixel noise, std 0.3, clamped to [0, 1]",
    "blur": "Gaussian blur, sigma 2 pixels",
    "invert": "inverted intensities (1 - x)",
    "dim": "intensities scaled by 0.4",
}


def corrupt(images: torch.Tensor, shift: str, *, seed: int = 0) -> torch.Tensor:
    """Corrupted float copies in [0, 1] of (N, C, H, W) images (uint8 or float)."""
    from nearfar.data.dataset import to_float
    from nearfar.views import GaussianBlur, GaussianNoise

    if shift not in SHIFTS:
        raise AuditError(f"shift: unknown corruption {shift!r}; known: {', '.join(SHIFTS)}")
    x = to_float(images)
    g = torch.Generator().manual_seed(seed)
    if shift == "noise":
        return GaussianNoise(std=0.3, p=1.0)(x, g)
    if shift == "blur":
        return GaussianBlur(sigma=2.0, p=1.0)(x, g)
    if shift == "invert":
        return 1.0 - x
    return x * 0.4


__all__ = ["SHIFTS", "corrupt"]
