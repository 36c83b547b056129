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
from nearfar.losses import hard_negative_info_nce, info_nce, partner_index
from nearfar.methods.base import Method, StepOutput, check_batch
from nearfar.methods.metrics import false_negative_rate
from nearfar.methods.registry import register_method
from nearfar.nn import ProjectionHead, build_encoder, parameter_count


def _describe_views(views: Callable) -> Any:
    describe = getattr(views, "describe", None)
    if callable(describe):
        return describe()
    return {"callable": getattr(views, "__qualname__", type(views).__name__)}


LOSSES = ("nt_xent", "debiased", "hard_negative")


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
        loss: "nt_xent"; "debiased" (Chuang et al., 2020: the negative term corrected
            for a class prior ``tau_plus``) or "hard_negative" (Robinson et al., 2021:
            also weighted towards hard negatives by ``beta``).
        tau_plus, beta: of the debiased / hard-negative losses.
        exclude_same_label: drop same-label pairs from the negatives (needs labels; for
            (semi-)supervised runs and false-negative studies).
        exclude_same_group: drop pairs with the same ``batch["group"]`` (per-item
            extras, e.g. duplicate-cluster or source ids) from the negatives.
    """

    name = "simclr"
    modality = "image"
    views_per_item = 2

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None, *,
                 temperature: float = 0.5, hidden_dim: int = 512, out_dim: int = 128,
                 num_layers: int = 2, keep_head: bool = False,
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 tile: int | None = None, loss: str = "nt_xent", tau_plus: float = 0.1,
                 beta: float = 1.0, exclude_same_label: bool = False,
                 exclude_same_group: bool = False) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss_name, self.tau_plus, self.beta = loss, float(tau_plus), float(beta)
        self.exclude_same_label = bool(exclude_same_label)
        self.exclude_same_group = bool(exclude_same_group)
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
        x = check_batch(batch, ndim=getattr(self.views, "input_ndim", 4))
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
        exclude = self._exclusion(batch, len(z1), z.device)
        if self.loss_name != "nt_xent":
            loss = hard_negative_info_nce(
                z1, z2, temperature=self.temperature, tau_plus=self.tau_plus,
                beta=self.beta if self.loss_name == "hard_negative" else 0.0, exclude=exclude)
        elif exclude is not None:
            loss = info_nce(z, z, partner_index(len(z1), device=z.device), exclude=exclude,
                            temperature=self.temperature, tile=self.tile)
        else:
            loss = nt_xent(z1, z2, temperature=self.temperature, tile=self.tile)
        with torch.no_grad():
            metrics = {"positive_cosine": F.cosine_similarity(z1, z2, dim=1).mean()}
            labels = batch.get("labels")
            if isinstance(labels, Tensor):
                # share of the scored negatives that carry the anchor's label
                own = torch.arange(len(z1), device=z.device).repeat(2)
                negatives = own[:, None] != own[None, :]
                if exclude is not None:
                    negatives &= ~exclude
                lab = labels.repeat(2)
                metrics["false_negative_rate"] = false_negative_rate(lab, lab,
                                                                     negatives=negatives)
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())

    def _exclusion(self, batch: dict[str, Any], n: int, device: torch.device) -> Tensor | None:
        """(2N, 2N) known false negatives (same label / same group), or None."""
        from nearfar.data.samplers import two_view_exclusion

        mask = None
        for wanted, key in ((self.exclude_same_label, "labels"),
                            (self.exclude_same_group, "group")):
            if not wanted:
                continue
            ids = batch.get(key)
            if not isinstance(ids, Tensor) or ids.shape != (n,):
                raise ValueError(f"batch[{key!r}]: expected ({n},) integer ids for "
                                 f"exclude_same_{key.rstrip('s')}, got "
                                 f"{getattr(ids, 'shape', ids)!r}")
            m = two_view_exclusion(ids.to(device))
            mask = m if mask is None else mask | m
        return mask

    def describe(self) -> dict[str, Any]:
        n = self.batch_size
        return {
            "method": "simclr",
            "reference": "Chen et al., 2020",
            "objective": {
                "loss": self.loss_name,
                "temperature": self.temperature,
                **({} if self.loss_name == "nt_xent" else {"tau_plus": self.tau_plus}),
                **({"beta": self.beta} if self.loss_name == "hard_negative" else {}),
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
                "exclusions": ["the anchor itself", "its partner view (the positive)"]
                + (["same-label items"] if self.exclude_same_label else [])
                + (["same-group items (batch['group'])"] if self.exclude_same_group else []),
            },
            "modality": self.modality,
            "encoder": {
                "class": type(self.encoder).__name__,
                "out_dim": int(self.encoder.out_dim),
                "parameters": parameter_count(self.encoder),
            },
        }
