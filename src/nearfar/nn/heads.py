"""Projection heads placed between an encoder and a contrastive objective."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """The SimCLR projection MLP (Chen et al., 2020): Linear-BN-ReLU, ..., Linear.

    Args:
        in_dim: size of the encoder features.
        hidden_dim: width of each hidden layer.
        out_dim: size of the projection the loss sees.
        num_layers: number of Linear layers (>= 1); 2 is the SimCLR head.
        batch_norm: put a BatchNorm1d after each hidden Linear.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, *,
                 num_layers: int = 2, batch_norm: bool = True) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                        ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(d, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
