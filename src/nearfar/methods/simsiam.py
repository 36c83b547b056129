"""SimSiam (Chen & He, 2021): BYOL without the momentum target.

Both views go through the same backbone and projector; a predictor on each side regresses
the other side's projection under a stop-gradient. No negatives, no EMA: the
stop-gradient alone prevents collapse.

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
from nearfar.nn.predictor import PredictionHead


@register_method("simsiam")
class SimSiam(TwoViewMethod):
    """Backbone + 3-layer projector (BatchNorm on every layer, the output's without
    affine) + bottleneck predictor; symmetric negative cosine with stop-gradient.

    Args:
        encoder, views, encoder_kwargs, seed: as :class:`~nearfar.methods.SimCLR`.
        hidden_dim, out_dim: the projector (SimSiam: 2048, 2048).
        predictor_hidden_dim: the predictor's bottleneck (SimSiam: 512 = out_dim / 4).
        grad_cache_chunk: embed the 2B views this many at a time with cached gradients
            (GradCache, Gao et al., 2021): the same loss, encoder, projector and predictor
            memory of one chunk; BatchNorm statistics per chunk (the projector's output
            BatchNorm included). None (default) embeds all at once.
    """

    name = "simsiam"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, hidden_dim: int = 512, out_dim: int = 512, predictor_hidden_dim: int = 128,
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        self.projector = nn.Sequential(
            ProjectionHead(self.feature_dim, hidden_dim, out_dim, num_layers=3),
            nn.BatchNorm1d(out_dim, affine=False),
        )
        self.predictor = PredictionHead(out_dim, predictor_hidden_dim)

    def _project_predict(self, v: Tensor) -> Tensor:
        """[projection | prediction], (n, 2 * out_dim): one tensor for embed_views."""
        z = self.projector(self.encode(v))
        return torch.cat([z, self.predictor(z)], dim=1)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        _, v1, v2 = self.draw_views(batch, generator)
        z, p = self.embed_views(self._project_predict, torch.cat([v1, v2])).float() \
            .chunk(2, dim=1)
        p1, p2 = p.chunk(2)
        z1, z2 = z.chunk(2)
        # negative_cosine detaches its target: the stop-gradient of SimSiam
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
        with torch.no_grad():
            metrics = {"projection_cosine": F.cosine_similarity(z1, z2, dim=1).mean(),
                       "projection_std": F.normalize(z1, dim=1).std(0).mean()}
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())

    def describe(self) -> dict[str, Any]:
        return {
            "method": "simsiam",
            "reference": "Chen & He, 2021",
            "objective": {
                "loss": "negative_cosine between the prediction of one view and the "
                        "stop-gradient projection of the other, symmetrised (mean of both)",
                "temperature": "n/a",
                "projection_head": head_card(self.projector),
                "predictor": head_card(self.predictor),
                "target": "the same network under stop-gradient (no momentum copy)",
                "head_downstream": "dropped",
            },
            "positives": {
                "construction": "two random views of the same image through one network",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "none: non-contrastive (SimSiam)",
                "construction": "none: collapse is prevented by the predictor and the "
                                "stop-gradient, not by negatives",
                "batch_size": self.batch_size,
                "per_anchor": 0,
                "exclusions": [],
            },
            "modality": self.modality,
            "encoder": self.encoder_card(),
        }
