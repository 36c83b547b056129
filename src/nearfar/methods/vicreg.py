"""VICReg (Bardes, Ponce & LeCun, 2022): variance, invariance, covariance.

An expander after the backbone; the two views' expansions are pulled together
(invariance), each dimension keeps a standard deviation of at least 1 over the batch
(variance) and different dimensions are decorrelated (covariance). No negatives.

Many processes (``gather``, see ``nearfar.methods.processes``): every term is over every
rank's batch (autograd-aware all-reduces of sums), so every rank computes the loss of one
process on the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nearfar.losses import vicreg_terms
from nearfar.methods.base import StepOutput
from nearfar.methods.processes import check_gather_option, gathering, processes_card
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import TwoViewMethod, check_number, head_card
from nearfar.nn import ProjectionHead


@register_method("vicreg")
class VICReg(TwoViewMethod):
    """Backbone + 3-layer expander; the weighted VICReg terms between the two views.

    Args:
        encoder, views, encoder_kwargs, seed: as :class:`~nearfar.methods.SimCLR`.
        hidden_dim, out_dim: the expander (VICReg: 8192, 8192).
        num_layers: Linear layers of the expander (3 in the paper).
        invariance_weight, variance_weight, covariance_weight: (paper: 25, 25, 1).
        gather: batch statistics over every process's batch (None: when
            torch.distributed runs with world size > 1).
        grad_cache_chunk: embed the 2B views this many at a time with cached gradients
            (GradCache, Gao et al., 2021): the same loss over the whole batch, encoder and
            expander memory of one chunk; BatchNorm statistics per chunk. None (default)
            embeds all at once.
    """

    name = "vicreg"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, hidden_dim: int = 512, out_dim: int = 512, num_layers: int = 3,
                 invariance_weight: float = 25.0, variance_weight: float = 25.0,
                 covariance_weight: float = 1.0,
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 gather: bool | None = None, grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        self.gather = check_gather_option(gather)
        self.weights = {
            "invariance": check_number(invariance_weight, "invariance_weight", low=0.0),
            "variance": check_number(variance_weight, "variance_weight", low=0.0),
            "covariance": check_number(covariance_weight, "covariance_weight", low=0.0),
        }
        self.expander = ProjectionHead(self.feature_dim, hidden_dim, out_dim,
                                       num_layers=num_layers)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        _, v1, v2 = self.draw_views(batch, generator)
        z1, z2 = self.embed_views(lambda v: self.expander(self.encode(v)),
                                  torch.cat([v1, v2])).float().chunk(2)
        terms = vicreg_terms(z1, z2, gather=gathering(self.gather))
        # the VICReg loss: the same weighted sum as nearfar.losses.vicreg, terms kept to log
        loss = (self.weights["invariance"] * terms.invariance
                + self.weights["variance"] * terms.variance
                + self.weights["covariance"] * terms.covariance)
        metrics = {name: value.detach() for name, value in terms._asdict().items()}
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())

    def describe(self) -> dict[str, Any]:
        return {
            "method": "vicreg",
            "reference": "Bardes, Ponce & LeCun, 2022",
            "objective": {
                "loss": "vicreg: weighted invariance + variance + covariance terms",
                "weights": dict(self.weights),
                "temperature": "n/a",
                "projection_head": head_card(self.expander),
                "head_downstream": "dropped",
                "batch_statistics": processes_card(self.gather),
            },
            "positives": {
                "construction": "two random views of the same image (invariance term)",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "none: non-contrastive (VICReg, variance-covariance "
                          "regularisation)",
                "construction": "none: collapse is prevented by the variance and covariance "
                                "terms over the batch, not by negatives",
                "batch_size": self.batch_size,
                "per_anchor": 0,
                "exclusions": [],
            },
            "modality": self.modality,
            "encoder": self.encoder_card(),
        }
