"""Alignment and uniformity of embeddings on the hypersphere (Wang & Isola, 2020).

Both are differentiable, so they serve as training losses (alignment + uniformity is a
contrastive objective in its own right) or, under ``torch.no_grad()``, as metrics of a
learned space: lower alignment means positives land close together, lower (more
negative) uniformity means the embeddings spread over the sphere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_embeddings, check_pair, check_positive_scalar

__all__ = ["alignment", "uniformity"]


def alignment(z1: Tensor, z2: Tensor, *, alpha: float = 2) -> Tensor:
    """Alignment of positive pairs (Wang & Isola, 2020).

        alignment = mean_i ||x_i - y_i||_2^alpha,   x = z1 / ||z1||, y = z2 / ||z2||

    Args:
        z1, z2: (N, D) embeddings; row i of each is a positive pair. Normalised inside.
        alpha: > 0 (paper: 2).

    Returns:
        Scalar in [0, 2^alpha]; 0 when every pair coincides.
    """
    z1, z2 = check_pair(z1, z2, "z1", "z2")
    check_positive_scalar(alpha, "alpha")
    diff = F.normalize(z1, dim=1) - F.normalize(z2, dim=1)
    if alpha == 2:
        return diff.pow(2).sum(1).mean()
    dist = torch.linalg.vector_norm(diff, dim=1)
    # for alpha < 1 the power has an infinite slope at 0; take gradient 0 at coincident pairs
    coincide = dist == 0
    safe = torch.where(coincide, torch.ones_like(dist), dist)
    return torch.where(coincide, torch.zeros_like(dist), safe.pow(alpha)).mean()


def uniformity(z: Tensor, *, t: float = 2) -> Tensor:
    """Uniformity of a set of embeddings (Wang & Isola, 2020).

        uniformity = log mean_{i < j} exp(-t ||x_i - x_j||_2^2),   x = z / ||z||

    the log of the average Gaussian potential over all N (N - 1) / 2 pairs, computed as
    a log-sum-exp so large t does not underflow.

    Args:
        z: (N, D) embeddings, N >= 2. Normalised inside.
        t: > 0 (paper: 2).

    Returns:
        Scalar in [-4t, 0]; 0 when all points coincide (collapse).
    """
    z = check_embeddings(z, "z", min_rows=2)
    check_positive_scalar(t, "t")
    sq_dist = torch.pdist(F.normalize(z, dim=1), p=2).pow(2)
    return torch.logsumexp(-t * sq_dist, dim=0) - math.log(sq_dist.numel())
