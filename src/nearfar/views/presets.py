"""Ready-made view pipelines."""

from __future__ import annotations

from nearfar.views.blur import GaussianBlur
from nearfar.views.color import ColorJitter
from nearfar.views.geometry import RandomAffine, RandomResizedCrop
from nearfar.views.noise import GaussianNoise
from nearfar.views.pipeline import Compose, TwoViews


def default_mnist_pipeline() -> Compose:
    """SimCLR-style views for 28x28 grayscale digits (a starting point; to be tuned).

    No horizontal flip (a mirrored 2 or 7 is not the same digit), small rotation
    and shift (a 6 rotated far becomes a 9), crops keeping at least 40% of the area,
    brightness/contrast jitter (no colour to change), mild blur and pixel noise.
    The crop and affine are fused into one resampling.
    """
    return Compose([
        RandomResizedCrop(scale=(0.4, 1.0), ratio=(0.8, 1.25)),
        RandomAffine(degrees=15.0, translate=(0.1, 0.1)),
        ColorJitter(brightness=0.4, contrast=0.4, p=0.8),
        GaussianBlur(sigma=(0.1, 1.0), kernel_size=5, p=0.5),
        GaussianNoise(std=(0.0, 0.1), p=0.5),
    ])


def default_mnist_views() -> TwoViews:
    """The positive pair for MNIST-like digits: two draws of :func:`default_mnist_pipeline`."""
    return TwoViews(default_mnist_pipeline())
