"""Photometric views: colour jitter, random grayscale, solarize.

On 1-channel images saturation, hue and grayscale have nothing to act on and are
no-ops; brightness and contrast work for any channel count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from nearfar.views.base import ViewOp, check_number, check_probability, check_range, coin, uniform

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as torchvision's rgb_to_grayscale
_RGB_TO_YIQ = torch.tensor([
    [0.299, 0.587, 0.114],
    [0.596, -0.274, -0.322],
    [0.211, -0.523, 0.312],
], dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def luma(x: Tensor) -> Tensor:
    """(B, 1, H, W) brightness: BT.601 weights for RGB, the channel mean otherwise."""
    if x.shape[1] == 3:
        weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _factor_range(name: str, around_one: bool):
    def from_number(v: float) -> tuple[float, float]:
        return (max(0.0, 1.0 - v), 1.0 + v) if around_one else (-v, v)
    return from_number


class ColorJitter(ViewOp):
    """Random brightness, contrast, saturation and hue, each image its own factors.

    Applied in that fixed order (torchvision shuffles the order per call), each step
    clamped to [0, 1]:

    - brightness: ``x * f``
    - contrast: ``m + f (x - m)``, m the image's mean luma
    - saturation (RGB only): ``g + f (x - g)``, g the pixel's luma
    - hue (RGB only): rotation of the chroma plane in YIQ space by ``2 pi h``
      (a close, cheap stand-in for torchvision's HSV hue shift).

    Args:
        brightness, contrast, saturation: a number v means factors in [max(0, 1 - v), 1 + v];
            or give [min, max] factors. 0 disables.
        hue: a number v in [0, 0.5] means shifts in [-v, v] of a full turn; or [min, max].
        p: probability of jittering an image (SimCLR uses 0.8).
    """

    name = "color_jitter"

    def __init__(self, brightness: float | Sequence[float] = 0.0,
                 contrast: float | Sequence[float] = 0.0,
                 saturation: float | Sequence[float] = 0.0,
                 hue: float | Sequence[float] = 0.0, p: float = 0.8):
        super().__init__()
        w = self.name
        self.params = {
            "brightness": check_range(brightness, f"{w}.brightness",
                                      from_number=_factor_range(w, True), low=0.0),
            "contrast": check_range(contrast, f"{w}.contrast",
                                    from_number=_factor_range(w, True), low=0.0),
            "saturation": check_range(saturation, f"{w}.saturation",
                                      from_number=_factor_range(w, True), low=0.0),
            "hue": check_range(hue, f"{w}.hue", from_number=_factor_range(w, False),
                               low=-0.5, high=0.5),
            "p": check_probability(p, f"{w}.p"),
        }

    def _factors(self, key: str, apply: Tensor, generator, device) -> Tensor | None:
        bounds = self.params[key]
        identity = 0.0 if key == "hue" else 1.0
        if bounds == (identity, identity):
            return None
        f = uniform(bounds, apply.shape[0], generator, device)
        return torch.where(apply, f, torch.full_like(f, identity))

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        b, c = x.shape[:2]
        apply = coin(self.p, b, generator, x.device)
        fb = self._factors("brightness", apply, generator, x.device)
        fc = self._factors("contrast", apply, generator, x.device)
        fs = self._factors("saturation", apply, generator, x.device)
        fh = self._factors("hue", apply, generator, x.device)
        if fb is not None:
            x = (x * fb.to(x.dtype).view(b, 1, 1, 1)).clamp_(0.0, 1.0)
        if fc is not None:
            mean = luma(x).mean(dim=(1, 2, 3), keepdim=True)
            x = torch.lerp(mean, x, fc.to(x.dtype).view(b, 1, 1, 1)).clamp_(0.0, 1.0)
        if c == 3 and fs is not None:
            gray = luma(x)
            x = torch.lerp(gray, x, fs.to(x.dtype).view(b, 1, 1, 1)).clamp_(0.0, 1.0)
        if c == 3 and fh is not None:
            x = _hue_rotate(x, fh)
        return x


def _hue_rotate(x: Tensor, turns: Tensor) -> Tensor:
    to_yiq = _RGB_TO_YIQ.to(x.device, torch.float32)
    from_yiq = _YIQ_TO_RGB.to(x.device, torch.float32)
    angle = turns.float() * (2.0 * math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(turns), 3, 3, device=x.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    m = (from_yiq @ rot @ to_yiq).to(x.dtype)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp_(0.0, 1.0)


class RandomGrayscale(ViewOp):
    """Replace an RGB image by its luma (kept as 3 channels) with probability ``p``.

    A no-op on images that are not 3-channel.
    """

    name = "random_grayscale"

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.params = {"p": check_probability(p, f"{self.name}.p")}

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if x.shape[1] != 3:
            return x
        apply = coin(self.p, x.shape[0], generator, x.device).view(-1, 1, 1, 1)
        return torch.where(apply, luma(x).expand_as(x), x)


class Solarize(ViewOp):
    """Invert pixels at or above ``threshold`` (``x -> 1 - x``) with probability ``p``.

    BYOL (Grill et al., 2020) uses it on one of the two views.
    """

    name = "solarize"

    def __init__(self, threshold: float = 0.5, p: float = 0.2):
        super().__init__()
        self.params = {
            "threshold": check_number(threshold, f"{self.name}.threshold", low=0.0, high=1.0),
            "p": check_probability(p, f"{self.name}.p"),
        }

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        apply = coin(self.p, x.shape[0], generator, x.device).view(-1, 1, 1, 1)
        return torch.where(apply & (x >= self.params["threshold"]), 1.0 - x, x)
