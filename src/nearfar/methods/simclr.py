"""SimCLR (Chen et al., 2020): two random views of each image, NT-Xent over the batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from nearfar.losses import nt_xent
except ImportError:  # pragma: no cover - until nearfar.losses re-exports it
    from nearfar.losses.infonce import nt_xent
from nearfar.methods.base import Method, StepOutput, check_batch
from nearfar.methods.registry import register_method
from nearfar.nn import ProjectionHead, build_encoder, parameter_count


def _describe_views(views: Callable) -> Any:
    describe = getattr(views, "describe", None)
    if callable(describe):
        return describe()
    return {"callable": getattr(views, "__qualname__", type(views).__name__)}


@register_method("simclr")
class SimCLR(Method):
    """Encoder -> projection head -> NT-Xent between two views of every image.

    Args:
        encoder: an ``nn.Module`` with an ``out_dim`` attribute, or a registered
            encoder name (built with ``encoder_kwargs``).
        views: how positives are made: a pair maker ``views(x, generator) -> (x1, x2)``
            (``nearfar.views.TwoViews``) or a pipeline ``views(x, generator) -> x``
            (``nearfar.views.Compose``, drawn twice); None uses
            ``nearfar.views.default_mnist_views()``.
        temperature: NT-Xent temperature (> 0).
        hidden_dim, out_dim, num_layers: the projection head (Linear-BN-ReLU-Linear).
        keep_head: when True, :meth:`embed` returns the projection instead of the
            encoder features (SimCLR drops the head downstream; the default).
        encoder_kwargs: constructor keywords when ``encoder`` is a name.
        seed: seeds the views when no generator is passed to :meth:`loss`.
        tile: rows per tile for the exact memory-linear NT-Xent path (None: automatic).
    """

    name = "simclr"
    modality = "image"
    views_per_item = 2

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None, *,
                 temperature: float = 0.5, hidden_dim: int = 512, out_dim: int = 128,
                 num_layers: int = 2, keep_head: bool = False,
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 tile: int | None = None) -> None:
        super().__init__()
        if isinstance(encoder, str):
            encoder = build_encoder(encoder, **dict(encoder_kwargs or {}))
        elif encoder_kwargs:
            raise ValueError("encoder_kwargs: only used when encoder is a name, got a module")
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"encoder: expected an nn.Module or a name, got "
                             f"{type(encoder).__name__}")
        out = getattr(encoder, "out_dim", None)
        if not isinstance(out, int):
            raise ValueError(f"encoder: expected an `out_dim` int attribute on "
                             f"{type(encoder).__name__}, got {out!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        if views is None:
            from nearfar.views import default_mnist_views

            views = default_mnist_views()
        if not callable(views):
            raise ValueError(f"views: expected a callable (images, generator) -> images, got "
                             f"{type(views).__name__}")
        self.encoder = encoder
        self.head = ProjectionHead(out, hidden_dim, out_dim, num_layers=num_layers)
        self.views = views
        self.temperature = float(temperature)
        self.keep_head = bool(keep_head)
        self.seed = int(seed)
        self.tile = tile
        self._own_generator: torch.Generator | None = None

    def embed(self, x: Tensor) -> Tensor:
        h = self.encoder(x.contiguous(memory_format=self.memory_format))
        return self.head(h) if self.keep_head else h

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._own_generator
        if g is None or g.device != device:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._own_generator = g
        return g

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        x = check_batch(batch)
        g = generator if generator is not None else self._generator(x.device)
        # views in fp32 even under autocast: bf16 resampling is slower on CPUs and coarser
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            out = self.views(x, g)
            if isinstance(out, (tuple, list)):
                v1, v2 = out
            else:
                v1, v2 = out, self.views(x, g)
        views = torch.cat([v1, v2]).contiguous(memory_format=self.memory_format)
        # one forward over both views: same BatchNorm statistics for both, one big conv
        z = self.head(self.encoder(views)).float()
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, temperature=self.temperature, tile=self.tile)
        with torch.no_grad():
            positive_cosine = F.cosine_similarity(z1, z2, dim=1).mean()
        return StepOutput(loss=loss, metrics={"positive_cosine": positive_cosine},
                          embeddings=z1.detach())

    def describe(self) -> dict[str, Any]:
        n = self.batch_size
        return {
            "method": "simclr",
            "reference": "Chen et al., 2020",
            "objective": {
                "loss": "nt_xent",
                "temperature": self.temperature,
                "projection_head": {
                    "in_dim": self.head.in_dim,
                    "out_dim": self.head.out_dim,
                    "layers": sum(isinstance(m, nn.Linear) for m in self.head.modules()),
                },
                "head_downstream": "kept" if self.keep_head else "dropped",
            },
            "positives": {
                "construction": "two independent random views of the same image",
                "views": _describe_views(self.views),
            },
            "negatives": {
                "source": "in-batch",
                "batch_size": n,
                "per_anchor": None if n is None else 2 * n - 2,
                "exclusions": ["the anchor itself", "its partner view (the positive)"],
            },
            "modality": self.modality,
            "encoder": {
                "class": type(self.encoder).__name__,
                "out_dim": int(self.encoder.out_dim),
                "parameters": parameter_count(self.encoder),
            },
        }
