"""BYOL, Bootstrap Your Own Latent (Grill et al., 2020).

An online network (backbone, projector, predictor) predicts the projection a slowly
moving target network (an EMA of backbone + projector) gives the other view of the same
image. No negatives: the predictor's asymmetry, the stop-gradient on the target and its
momentum keep the representation from collapsing.

Many processes: the loss is a mean of per-image terms, so each rank's mean over its own
images, averaged by DDP, is already the global loss and gradient; nothing is gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar.losses import negative_cosine
from nearfar.methods.base import StepOutput
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import TwoViewMethod, head_card
from nearfar.nn import ProjectionHead
from nearfar.nn.momentum import EMA
from nearfar.nn.predictor import PredictionHead


@register_method("byol")
class BYOL(TwoViewMethod):
    """Online backbone + projector + predictor regressing an EMA target's projection.

    Args:
        encoder, views, encoder_kwargs, seed: as :class:`~nearfar.methods.SimCLR`.
        hidden_dim, out_dim: the 2-layer projector (BYOL: 4096 -> 256).
        predictor_hidden_dim: hidden width of the predictor (BYOL: 4096).
        base_momentum: target momentum at the start (BYOL: 0.996; a few hundred steps
            need less, e.g. 0.99), raised to 1.0 along a cosine when
            ``momentum_schedule="cosine"``.
        momentum_schedule: "cosine" or "constant".
        grad_cache_chunk: run the online network (backbone, projector, predictor) over
            the 2B views this many at a time with cached gradients (GradCache, Gao et
            al., 2021): the same loss, online activation memory of one chunk; BatchNorm
            statistics per chunk. The target runs under no_grad on all views at once.
            None (default) embeds all at once.
    """

    name = "byol"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, hidden_dim: int = 512, out_dim: int = 128, predictor_hidden_dim: int = 512,
                 base_momentum: float = 0.996, momentum_schedule: str = "cosine",
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        self.projector = ProjectionHead(self.feature_dim, hidden_dim, out_dim, num_layers=2)
        self.predictor = PredictionHead(out_dim, predictor_hidden_dim)
        self.target = EMA(self._online(), base_momentum, schedule=momentum_schedule)

    def _online(self) -> nn.Module:
        return nn.Sequential(self.encoder, self.projector)

    def _project_predict(self, v: Tensor) -> Tensor:
        """[projection | prediction], (n, 2 * out_dim): one tensor for embed_views."""
        z = self.projector(self.encode(v))
        return torch.cat([z, self.predictor(z)], dim=1)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        _, v1, v2 = self.draw_views(batch, generator)
        views = torch.cat([v1, v2]).contiguous(memory_format=self.memory_format)
        z, p = self.embed_views(self._project_predict, views).float().chunk(2, dim=1)
        p1, p2 = p.chunk(2)
        with torch.no_grad():
            t1, t2 = self.target(views).float().chunk(2)
        # symmetrised: each view's prediction regresses the target of the other view
        loss = negative_cosine(p1, t2) + negative_cosine(p2, t1)
        with torch.no_grad():
            z1 = z.chunk(2)[0]
            metrics = {"momentum": self.target.last_momentum.clone(),
                       "target_cosine": F.cosine_similarity(t1, t2, dim=1).mean()}
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())

    def after_step(self, progress: float) -> None:
        self.target.update(self._online(), progress)

    def describe(self) -> dict[str, Any]:
        return {
            "method": "byol",
            "reference": "Grill et al., 2020",
            "objective": {
                "loss": "negative_cosine between the online prediction of one view and the "
                        "target projection of the other, symmetrised (sum of both ways)",
                "temperature": "n/a",
                "projection_head": head_card(self.projector),
                "predictor": head_card(self.predictor),
                "target": {"kind": "momentum (EMA) copy of encoder + projector, "
                                   "stop-gradient",
                           "momentum": {"base": self.target.base_momentum,
                                        "schedule": self.target.schedule}},
                "head_downstream": "dropped",
            },
            "positives": {
                "construction": "two random views of the same image: online prediction of "
                                "one, EMA target projection of the other",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "none: non-contrastive (BYOL)",
                "construction": "none: collapse is prevented by the predictor, the "
                                "stop-gradient and the momentum target, not by negatives",
                "batch_size": self.batch_size,
                "per_anchor": 0,
                "exclusions": [],
            },
            "modality": self.modality,
            "encoder": self.encoder_card(),
        }
