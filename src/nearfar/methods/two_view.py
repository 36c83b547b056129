"""What the two-view image methods share: building the encoder, drawing the views, the
encoder and views sections of ``describe()``.

Each method file (MoCo, BYOL, SimSiam, Barlow Twins, VICReg, DINO, SupCon) subclasses
:class:`TwoViewMethod` and adds its heads, its momentum copy or queue, and its loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nearfar.methods.base import Method, check_batch
from nearfar.methods.grad_cache import cached_gradient_forward
from nearfar.nn import parameter_count, resolve_encoder


def check_number(value: object, name: str, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> float:
    """A real number within bounds, else ValueError naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        raise ValueError(f"{name}: expected a number {' and '.join(bounds)}, got {value!r}")
    return float(value)


def check_int(value: object, name: str, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def describe_views(views: Callable) -> Any:
    describe = getattr(views, "describe", None)
    if callable(describe):
        return describe()
    return {"callable": getattr(views, "__qualname__", type(views).__name__)}


def batch_labels(batch: dict[str, Any]) -> Tensor | None:
    labels = batch.get("labels")
    return labels if isinstance(labels, Tensor) else None


class TwoViewMethod(Method):
    """An encoder and a pair maker; subclasses add heads and the objective.

    Args:
        encoder: an ``nn.Module`` with an ``out_dim`` attribute, or a registered encoder
            name (built with ``encoder_kwargs``).
        views: a pair maker ``views(x, generator) -> (x1, x2)`` (``nearfar.views.TwoViews``)
            or a pipeline ``views(x, generator) -> x`` (drawn twice); None uses
            ``nearfar.views.default_mnist_views()``.
        encoder_kwargs: constructor keywords when ``encoder`` is a name.
        seed: seeds the views when no generator is passed to :meth:`loss`.
        grad_cache_chunk: None embeds the whole batch at once; k embeds it k rows at a
            time with cached gradients (GradCache, Gao et al., 2021;
            ``nearfar.methods.grad_cache``): the same loss over the whole batch, encoder
            activation memory of k rows, about one extra forward pass of compute.
            BatchNorm batch statistics are then per chunk of k rows.
    """

    modality = "image"
    views_per_item = 2

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 grad_cache_chunk: int | None = None) -> None:
        super().__init__()
        if grad_cache_chunk is not None:
            check_int(grad_cache_chunk, "grad_cache_chunk")
        encoder = resolve_encoder(encoder, encoder_kwargs)
        out = getattr(encoder, "out_dim", None)
        if not isinstance(out, int):
            raise ValueError(f"encoder: expected an `out_dim` int attribute on "
                             f"{type(encoder).__name__}, got {out!r}")
        if views is None:
            from nearfar.views import default_mnist_views

            views = default_mnist_views()
        if not callable(views):
            raise ValueError(f"views: expected a callable (images, generator) -> images, got "
                             f"{type(views).__name__}")
        self.encoder = encoder
        self.views = views
        self.seed = int(seed)
        self.grad_cache_chunk = grad_cache_chunk
        self._own_generator: torch.Generator | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.out_dim)

    def embed(self, x: Tensor) -> Tensor:
        return self.encoder(x.contiguous(memory_format=self.memory_format))

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._own_generator
        if g is None or g.device != device:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._own_generator = g
        return g

    def draw_views(self, batch: dict[str, Any], generator: torch.Generator | None
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """The checked images and their two views (no gradient through the views)."""
        x = check_batch(batch, ndim=getattr(self.views, "input_ndim", 4))
        g = generator if generator is not None else self._generator(x.device)
        # views in fp32 even under autocast: bf16 resampling is slower on CPUs and coarser
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            out = self.views(x, g)
            if isinstance(out, (tuple, list)):
                v1, v2 = out
            else:
                v1, v2 = out, self.views(x, g)
        return x, v1, v2

    def encode(self, x: Tensor) -> Tensor:
        """Backbone features of an image batch, in the trainer's memory format."""
        return self.encoder(x.contiguous(memory_format=self.memory_format))

    def embed_views(self, fn: Callable[[Tensor], Tensor], views: Tensor) -> Tensor:
        """``fn(views)``, (B, ...) -> (B, D), e.g. ``lambda v: head(encode(v))``; with
        ``grad_cache_chunk`` set, computed chunk by chunk with cached gradients
        (``nearfar.methods.grad_cache``), so ``loss.backward()`` recomputes one chunk at a
        time. ``fn`` may use only this method's parameters."""
        if self.grad_cache_chunk is None:
            return fn(views)
        return cached_gradient_forward(fn, views, self.grad_cache_chunk, module=self)

    def encoder_card(self) -> dict[str, Any]:
        card = {
            "class": type(self.encoder).__name__,
            "out_dim": int(self.encoder.out_dim),
            "parameters": parameter_count(self.encoder),
        }
        if self.grad_cache_chunk is not None:
            card["grad_cache_chunk"] = self.grad_cache_chunk
        return card

    def views_card(self) -> Any:
        return describe_views(self.views)


def head_card(head: nn.Module) -> dict[str, Any]:
    """Sizes of a head for ``describe()``: input, output, Linear layers."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return {
        "in_dim": linears[0].in_features if linears else None,
        "out_dim": getattr(head, "out_dim", linears[-1].out_features if linears else None),
        "layers": len(linears),
    }
