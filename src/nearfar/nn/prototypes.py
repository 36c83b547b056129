"""DINO's projection head onto K prototypes (Caron et al., 2021).

An MLP (Linear-GELU, ..., Linear) to a bottleneck, L2 normalisation, then a linear layer
with unit-norm rows, the K prototypes (DINO's weight-normalised last layer with its norm
fixed to 1): each logit is the cosine between the bottleneck and one prototype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DinoHead(nn.Module):
    """MLP -> L2 normalise -> cosine to K unit-norm prototypes.

    Args:
        in_dim: size of the encoder features.
        hidden_dim: width of the hidden layers (DINO: 2048).
        bottleneck_dim: size before the prototypes (DINO: 256).
        num_prototypes: K, the number of output logits (DINO: 65536).
        num_layers: Linear layers of the MLP (DINO: 3).
        batch_norm: BatchNorm after the hidden Linear layers (DINO: off for ViT, on in
            its ResNet runs).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 64,
                 num_prototypes: int = 1024, *, num_layers: int = 3,
                 batch_norm: bool = False) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim), ("num_prototypes", num_prototypes),
                        ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(d, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            d = hidden_dim
        layers.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        self.in_dim = in_dim
        self.bottleneck_dim = bottleneck_dim
        self.num_prototypes = num_prototypes

    def forward(self, x: Tensor, *, freeze_prototypes: bool = False) -> Tensor:
        """(B, in_dim) -> (B, K) prototype logits, each in [-1, 1].

        ``freeze_prototypes`` keeps the gradient from the prototypes (DINO freezes the
        last layer during the first epoch, which stabilises the start of training).
        """
        h = F.normalize(self.mlp(x), dim=1)
        w = self.prototypes.detach() if freeze_prototypes else self.prototypes
        return h @ F.normalize(w, dim=1).t()
