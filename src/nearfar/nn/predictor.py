"""Prediction heads: the small MLP an online branch uses to predict its target.

BYOL (Grill et al., 2020) and SimSiam (Chen & He, 2021) put a predictor after the online
projection, and MoCo v3 (Chen et al., 2021) after the query projection; the asymmetry it
creates, with the stop-gradient on the target, is what keeps these objectives from
collapsing without negatives.
"""

from __future__ import annotations

from nearfar.nn.heads import ProjectionHead


class PredictionHead(ProjectionHead):
    """Linear-BN-ReLU-Linear from ``dim`` back to ``dim`` (BYOL: 256 -> 4096 -> 256;
    SimSiam uses a bottleneck: 2048 -> 512 -> 2048).

    Args:
        dim: size of the projection it reads and of the prediction it returns.
        hidden_dim: width of the hidden layer.
        num_layers: number of Linear layers (2 in BYOL, SimSiam, MoCo v3).
    """

    def __init__(self, dim: int, hidden_dim: int = 512, *, num_layers: int = 2) -> None:
        super().__init__(dim, hidden_dim, dim, num_layers=num_layers, batch_norm=True)
