"""Geometric views: random resized crop, horizontal flip, random affine (rotation,
translation, scale, shear).

Each geometric op is a per-image 3x3 matrix that maps *output* coordinates to
*input* coordinates, in the normalised [-1, 1] frame of ``F.affine_grid``. A run of
consecutive geometric ops in a :class:`nearfar.views.Compose` multiplies its
matrices and resamples the batch once (one ``affine_grid`` + ``grid_sample``):
faster, and only one bilinear interpolation blurs the image. Areas that come from
outside the source image are filled with 0 (black).

The frame is ``align_corners=True``: -1 and +1 are the centres of the outermost
pixels, so a crop box inside [-1, 1] only ever samples between pixel centres (a
crop touching the edge is not darkened by the padding) and the identity, flips
and quarter turns are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nearfar.views.base import (
    ViewOp,
    check_number,
    check_probability,
    check_range,
    coin,
    uniform,
)


class GeometricOp(ViewOp):
    """A view op that is an affine map of the image plane (fusable with its neighbours)."""

    def matrices(self, n: int, size: tuple[int, int], generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
        """(n, 3, 3) float32: output -> input normalised coordinates, one per image.

        ``size`` is the (height, width) of this op's input.
        """
        raise NotImplementedError

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return apply_geometry(x, [self], generator)


def _eye(n: int, device: torch.device) -> Tensor:
    return torch.eye(3, device=device).expand(n, 3, 3).clone()


def _axis(steps: int, device: torch.device) -> Tensor:
    if steps <= 1:
        return torch.zeros(max(steps, 0), device=device)
    return torch.linspace(-1.0, 1.0, steps, device=device)


def _affine_grid(theta: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=True)`` as one broadcast matmul
    (about 3x faster on CPU)."""
    h, w = size
    ys, xs = _axis(h, theta.device), _axis(w, theta.device)
    base = torch.stack([
        xs.view(1, w).expand(h, w),
        ys.view(h, 1).expand(h, w),
        torch.ones(h, w, device=theta.device),
    ], dim=-1).view(1, h * w, 3)
    return torch.matmul(base, theta.transpose(1, 2)).view(-1, h, w, 2)


def apply_geometry(x: Tensor, ops: Sequence[GeometricOp],
                   generator: torch.Generator | None) -> Tensor:
    """Apply ``ops`` in order with a single resampling of ``x`` (B, C, H, W)."""
    ops = [op for op in ops if op.p > 0.0]
    if not ops or x.shape[0] == 0:
        return x
    b, c, h, w = x.shape
    theta = _eye(b, x.device)
    size = (h, w)
    for op in ops:
        theta = theta @ op.matrices(b, size, generator, x.device)
        size = op.output_size(size)
    # float32 sampling whatever the batch dtype: cheap here, and exact enough for identity maps
    grid = _affine_grid(theta[:, :2], size)
    src = x if x.dtype == torch.float32 else x.to(torch.float32)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(x.dtype)


def _parse_size(size: Any, where: str) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
        return (size, size)
    if (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"{where}: expected an int >= 1 or [height, width], got {size!r}")


class RandomResizedCrop(GeometricOp):
    """Crop a random area and aspect ratio, resized back to the input (or ``size``).

    As torchvision's RandomResizedCrop (Szegedy et al., 2015; SimCLR's main view):
    area fraction ~ U(scale), log aspect ratio ~ U(log ratio), position uniform;
    10 tries per image for a crop that fits, else the whole image.

    Args:
        scale: [min, max] fraction of the image area kept, in (0, 1].
        ratio: [min, max] width / height of the crop (in pixels), > 0.
        size: output (height, width) or int; None keeps the input size.
        p: probability of cropping an image (otherwise the image is only resized).
    """

    name = "random_resized_crop"
    _TRIES = 10

    def __init__(self, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), size: int | Sequence[int] | None = None,
                 p: float = 1.0):
        super().__init__()
        self.params = {
            "scale": check_range(scale, f"{self.name}.scale", low=0.0, high=1.0, low_open=True),
            "ratio": check_range(ratio, f"{self.name}.ratio", low=0.0, low_open=True),
            "size": _parse_size(size, f"{self.name}.size"),
            "p": check_probability(p, f"{self.name}.p"),
        }

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.params["size"] or size

    def matrices(self, n, size, generator, device):
        h, w = size
        apply = coin(self.p, n, generator, device)
        t = self._TRIES
        area = uniform(self.params["scale"], (n, t), generator, device)
        lo, hi = self.params["ratio"]
        ratio = torch.exp(uniform((math.log(lo), math.log(hi)), (n, t), generator, device))
        cw = torch.sqrt(area * ratio * h / w)   # crop width / image width
        ch = torch.sqrt(area / ratio * w / h)   # crop height / image height
        fits = (cw <= 1.0) & (ch <= 1.0)
        first = fits.float().argmax(dim=1, keepdim=True)  # first crop that fits
        cw = cw.gather(1, first).squeeze(1)
        ch = ch.gather(1, first).squeeze(1)
        use = apply & fits.any(dim=1)
        one = torch.ones_like(cw)
        cw = torch.where(use, cw, one)
        ch = torch.where(use, ch, one)
        cx = (rand_pm(n, generator, device)) * (1.0 - cw)
        cy = (rand_pm(n, generator, device)) * (1.0 - ch)
        m = _eye(n, device)
        m[:, 0, 0] = cw
        m[:, 0, 2] = cx
        m[:, 1, 1] = ch
        m[:, 1, 2] = cy
        return m


def rand_pm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[-1, 1)."""
    return uniform((-1.0, 1.0), n, generator, device)


class HorizontalFlip(GeometricOp):
    """Mirror left-right with probability ``p`` (leave it out for digits and text)."""

    name = "horizontal_flip"

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.params = {"p": check_probability(p, f"{self.name}.p")}

    def matrices(self, n, size, generator, device):
        flip = coin(self.p, n, generator, device)
        m = _eye(n, device)
        m[:, 0, 0] = torch.where(flip, -1.0, 1.0)
        return m


class RandomAffine(GeometricOp):
    """Rotate, translate, scale and shear about the image centre, per image.

    Args:
        degrees: rotation range in degrees; a number d means [-d, d]. Positive is
            counter-clockwise on screen.
        translate: [fx, fy], the largest shift as a fraction of width / height.
        scale: [min, max] zoom of the content (1 = unchanged).
        shear: x-shear range in degrees; a number s means [-s, s].
        p: probability of transforming an image.
    """

    name = "random_affine"

    def __init__(self, degrees: float | Sequence[float] = 0.0,
                 translate: Sequence[float] = (0.0, 0.0),
                 scale: Sequence[float] = (1.0, 1.0), shear: float | Sequence[float] = 0.0,
                 p: float = 1.0):
        super().__init__()
        where = self.name
        if not (isinstance(translate, (list, tuple)) and len(translate) == 2):
            raise ValueError(f"{where}.translate: expected [fx, fy] in [0, 1], got {translate!r}")
        fx = check_number(translate[0], f"{where}.translate[0]", low=0.0, high=1.0)
        fy = check_number(translate[1], f"{where}.translate[1]", low=0.0, high=1.0)
        self.params = {
            "degrees": check_range(degrees, f"{where}.degrees", from_number=lambda d: (-d, d),
                                   low=-360.0, high=360.0),
            "translate": (fx, fy),
            "scale": check_range(scale, f"{where}.scale", low=0.0, low_open=True),
            "shear": check_range(shear, f"{where}.shear", from_number=lambda d: (-d, d),
                                 low=-80.0, high=80.0),
            "p": check_probability(p, f"{where}.p"),
        }

    def matrices(self, n, size, generator, device):
        h, w = size
        apply = coin(self.p, n, generator, device)
        angle = torch.deg2rad(uniform(self.params["degrees"], n, generator, device))
        fx, fy = self.params["translate"]
        tx = rand_pm(n, generator, device) * (fx * w)
        ty = rand_pm(n, generator, device) * (fy * h)
        zoom = uniform(self.params["scale"], n, generator, device)
        shear = torch.tan(torch.deg2rad(uniform(self.params["shear"], n, generator, device)))
        zero, one = torch.zeros_like(angle), torch.ones_like(angle)
        angle = torch.where(apply, angle, zero)
        tx, ty = torch.where(apply, tx, zero), torch.where(apply, ty, zero)
        zoom = torch.where(apply, zoom, one)
        shear = torch.where(apply, shear, zero)
        # Forward map of the content, in pixels about the centre (y points down):
        # A = R(angle) @ Shear @ zoom, then + t. Sampling needs the inverse.
        cos, sin = torch.cos(angle), torch.sin(angle)
        fwd = torch.zeros(n, 2, 2, device=device)
        fwd[:, 0, 0] = cos * zoom
        fwd[:, 0, 1] = (cos * shear + sin) * zoom
        fwd[:, 1, 0] = -sin * zoom
        fwd[:, 1, 1] = (-sin * shear + cos) * zoom
        # closed-form 2x2 inverse (det = zoom^2 > 0): no solver, no device sync
        det = (fwd[:, 0, 0] * fwd[:, 1, 1] - fwd[:, 0, 1] * fwd[:, 1, 0]).view(n, 1, 1)
        inv = torch.stack([
            torch.stack([fwd[:, 1, 1], -fwd[:, 0, 1]], dim=1),
            torch.stack([-fwd[:, 1, 0], fwd[:, 0, 0]], dim=1),
        ], dim=1) / det
        t = torch.stack([tx, ty], dim=1).unsqueeze(2)
        pixel = _eye(n, device)
        pixel[:, :2, :2] = inv
        pixel[:, :2, 2:] = -inv @ t
        # pixels per normalised unit (align_corners=True: +-1 are the outer pixel centres)
        half = torch.tensor([max(w - 1, 1) / 2.0, max(h - 1, 1) / 2.0, 1.0], device=device)
        # normalised -> pixel (S), pixel map, pixel -> normalised (S^-1)
        return pixel * half.view(1, 1, 3) / half.view(1, 3, 1)
