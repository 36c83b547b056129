"""How positives are made: batched tensor augmentations that run on the training device.

Every op maps a (B, C, H, W) float batch in [0, 1] and a ``torch.Generator`` to a
new batch, each image with its own random parameters, without a per-image Python
loop; each op and pipeline describes itself as plain data for the model card::

    import torch
    from nearfar.views import build_pipeline, TwoViews, default_mnist_views

    views = default_mnist_views()
    g = torch.Generator().manual_seed(0)
    x1, x2 = views(batch, g)                  # the SimCLR positive pair
    views.describe()                          # -> card "positive construction"

    pipeline = build_pipeline([{"name": "random_resized_crop", "scale": [0.4, 1.0]},
                               {"name": "noise", "std": 0.05}])
"""

from nearfar.views.base import ViewOp, as_float_batch
from nearfar.views.blur import GaussianBlur
from nearfar.views.color import ColorJitter, RandomGrayscale, Solarize, luma
from nearfar.views.geometry import (
    GeometricOp,
    HorizontalFlip,
    RandomAffine,
    RandomResizedCrop,
    apply_geometry,
)
from nearfar.views.grid import save_pair_grid
from nearfar.views.noise import GaussianNoise
from nearfar.views.pipeline import (
    ALIASES,
    OPS,
    Compose,
    TwoViews,
    build_op,
    build_pipeline,
    build_two_views,
    register_op,
)
from nearfar.views.presets import default_mnist_pipeline, default_mnist_views

__all__ = [
    "ALIASES",
    "OPS",
    "ColorJitter",
    "Compose",
    "GaussianBlur",
    "GaussianNoise",
    "GeometricOp",
    "HorizontalFlip",
    "RandomAffine",
    "RandomGrayscale",
    "RandomResizedCrop",
    "Solarize",
    "TwoViews",
    "ViewOp",
    "apply_geometry",
    "as_float_batch",
    "build_op",
    "build_pipeline",
    "build_two_views",
    "default_mnist_pipeline",
    "default_mnist_views",
    "luma",
    "register_op",
    "save_pair_grid",
]

# temporal positives for sequences (issue 4)
from nearfar.views.temporal import TemporalPairs, WindowPair  # noqa: E402

__all__ += ["TemporalPairs", "WindowPair"]
