"""Barlow Twins (Zbontar et al., 2021): redundancy reduction between two views.

The cross-correlation matrix between the two views' standardised projections is driven
to the identity: invariance on the diagonal, decorrelated features off it. No negatives,
no predictor, no momentum copy.

Many processes (``gather``, see ``nearfar.methods.processes``): the standardisation and
the cross-correlation are over every rank's batch (autograd-aware all-reduces of sums),
so every rank computes the loss of one process on the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nearfar.losses import barlow_twins
from nearfar.methods.base import StepOutput
from nearfar.methods.processes import check_gather_option, gathering, processes_card
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import TwoViewMethod, check_number, head_card
from nearfar.nn import ProjectionHead


@register_method("barlow_twins")
class BarlowTwins(TwoViewMethod):
    """Backbone + 3-layer projector; the Barlow Twins loss between the two views.

    Args:
        encoder, views, encoder_kwargs, seed: as :class:`~nearfar.methods.SimCLR`.
        hidden_dim, out_dim: the projector (Barlow Twins: 8192, 8192).
        num_layers: Linear layers of the projector (3 in the paper).
        lambda_offdiag: weight of the redundancy (off-diagonal) term (paper: 5e-3,
            tuned for D = 8192).
        gather: batch statistics over every process's batch (None: when
            torch.distributed runs with world size > 1).
        grad_cache_chunk: embed the 2B views this many at a time with cached gradients
            (GradCache, Gao et al., 2021): the same loss over the whole batch, encoder and
            projector memory of one chunk; BatchNorm statistics per chunk. None (default)
            embeds all at once.
    """

    name = "barlow_twins"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, hidden_dim: int = 512, out_dim: int = 512, num_layers: int = 3,
                 lambda_offdiag: float = 5e-3,
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 gather: bool | None = None, grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        self.gather = check_gather_option(gather)
        self.lambda_offdiag = check_number(lambda_offdiag, "lambda_offdiag", low=0.0)
        self.projector = ProjectionHead(self.feature_dim, hidden_dim, out_dim,
                                        num_layers=num_layers)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        _, v1, v2 = self.draw_views(batch, generator)
        z1, z2 = self.embed_views(lambda v: self.projector(self.encode(v)),
                                  torch.cat([v1, v2])).float().chunk(2)
        loss = barlow_twins(z1, z2, lambda_offdiag=self.lambda_offdiag,
                            gather=gathering(self.gather))
        with torch.no_grad():
            metrics = {"projection_cosine": F.cosine_similarity(z1, z2, dim=1).mean()}
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())

    def describe(self) -> dict[str, Any]:
        return {
            "method": "barlow_twins",
            "reference": "Zbontar et al., 2021",
            "objective": {
                "loss": "barlow_twins: cross-correlation of the two views' standardised "
                        "projections driven to the identity",
                "lambda_offdiag": self.lambda_offdiag,
                "temperature": "n/a",
                "projection_head": head_card(self.projector),
                "head_downstream": "dropped",
                "batch_statistics": processes_card(self.gather),
            },
            "positives": {
                "construction": "two random views of the same image (the diagonal of the "
                                "cross-correlation)",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "none: non-contrastive (Barlow Twins, redundancy reduction)",
                "construction": "none: collapse is prevented by decorrelating feature "
                                "dimensions over the batch, not by negatives",
                "batch_size": self.batch_size,
                "per_anchor": 0,
                "exclusions": [],
            },
            "modality": self.modality,
            "encoder": self.encoder_card(),
        }
