"""Additive Gaussian pixel noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nearfar.views.base import ViewOp, check_probability, check_range, coin, randn, uniform


class GaussianNoise(ViewOp):
    """``x + std * N(0, 1)`` per pixel, clamped to [0, 1]; each image its own std.

    Args:
        std: one number, or [min, max] to draw each image's std uniformly.
        p: probability of adding noise to an image.
    """

    name = "gaussian_noise"

    def __init__(self, std: float | Sequence[float] = 0.05, p: float = 0.5):
        super().__init__()
        self.params = {
            "std": check_range(std, f"{self.name}.std", from_number=lambda s: (s, s), low=0.0),
            "p": check_probability(p, f"{self.name}.p"),
        }

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        b = x.shape[0]
        apply = coin(self.p, b, generator, x.device)
        std = uniform(self.params["std"], b, generator, x.device)
        std = torch.where(apply, std, torch.zeros_like(std)).to(x.dtype).view(b, 1, 1, 1)
        noise = randn(x.shape, generator, x.device).to(x.dtype)
        return (x + std * noise).clamp_(0.0, 1.0)
