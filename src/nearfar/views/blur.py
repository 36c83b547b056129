"""Gaussian blur with a different sigma per image, as one separable pass over the batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nearfar.views.base import ViewOp, check_number, check_probability, check_range, coin, uniform


class GaussianBlur(ViewOp):
    """Blur each image with its own sigma ~ U(sigma) (SimCLR: Chen et al., 2020).

    Separable: a vertical then a horizontal 1-D pass, each a grouped convolution
    with one kernel per (image, channel); borders reflect.

    Args:
        sigma: [min, max] standard deviation in pixels, or one number for a fixed sigma.
        kernel_size: odd tap count; None uses ``2 * ceil(3 * max sigma) + 1``. Always
            capped at the largest odd number that fits in the image.
        p: probability of blurring an image.
    """

    name = "gaussian_blur"

    def __init__(self, sigma: float | Sequence[float] = (0.1, 2.0),
                 kernel_size: int | None = None, p: float = 0.5):
        super().__init__()
        if kernel_size is not None:
            k = check_number(kernel_size, f"{self.name}.kernel_size", low=3)
            if k != int(k) or int(k) % 2 == 0:
                raise ValueError(
                    f"{self.name}.kernel_size: expected an odd integer >= 3, got {kernel_size!r}"
                )
            kernel_size = int(k)
        self.params = {
            "sigma": check_range(sigma, f"{self.name}.sigma", from_number=lambda s: (s, s),
                                 low=0.0, low_open=True),
            "kernel_size": kernel_size,
            "p": check_probability(p, f"{self.name}.p"),
        }

    def _kernel_size(self, h: int, w: int) -> int:
        k = self.params["kernel_size"] or 2 * math.ceil(3.0 * self.params["sigma"][1]) + 1
        fit = min(h, w)
        fit = fit if fit % 2 == 1 else fit - 1
        return min(k, fit)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        b, c, h, w = x.shape
        apply = coin(self.p, b, generator, x.device)
        sigma = uniform(self.params["sigma"], b, generator, x.device)
        k = self._kernel_size(h, w)
        if k < 3:
            return x
        offsets = torch.arange(k, device=x.device, dtype=torch.float32) - (k // 2)
        kernel = torch.exp(-(offsets.view(1, k) ** 2) / (2.0 * sigma.view(b, 1) ** 2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        delta = torch.zeros(k, device=x.device)
        delta[k // 2] = 1.0
        kernel = torch.where(apply.view(b, 1), kernel, delta.view(1, k))
        kernel = kernel.repeat_interleave(c, dim=0).to(x.dtype)  # (B*C, k)
        r = k // 2
        flat = x.reshape(1, b * c, h, w)
        flat = F.pad(flat, (r, r, r, r), mode="reflect")
        flat = F.conv2d(flat, kernel.view(b * c, 1, k, 1), groups=b * c)
        flat = F.conv2d(flat, kernel.view(b * c, 1, 1, k), groups=b * c)
        return flat.view(b, c, h, w)
