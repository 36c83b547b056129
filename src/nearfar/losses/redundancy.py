"""Redundancy-reduction objectives: invariance plus decorrelated feature dimensions.

Barlow Twins (Zbontar et al., 2021) drives the cross-correlation between the two views'
standardised features to the identity; VICReg (Bardes et al., 2022) splits the same idea
into invariance, variance and covariance terms. Both need batch statistics (N >= 2).

Many processes (``torch.distributed``): with ``gather=True`` every statistic (means,
variances, the cross-correlation, the covariances, the invariance sum) is a sum over the
global batch, all-reduced with `nearfar.distributed.all_reduce_with_grad`, whose backward
all-reduces the gradient as well. Every rank then computes the same loss, the loss of one
process on the concatenated batch, and DDP's gradient averaging gives its exact gradient.
(A plain ``dist.all_reduce`` outside autograd, as some peer libraries did, keeps only the
local samples' share of the gradient and after DDP's averaging leaves it W times too
small.) The all-reduced statistics are (D, D) per view pair: for D much larger than the
global batch, gathering the embeddings would move less data.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_nonnegative, check_pair, check_positive_scalar
from .collective import check_gather, reduce_sums, world_size

__all__ = ["barlow_twins", "vicreg", "vicreg_terms", "VicregTerms"]


def _off_diagonal(m: Tensor) -> Tensor:
    return m.masked_select(~torch.eye(m.shape[0], dtype=torch.bool, device=m.device))


def barlow_twins(z1: Tensor, z2: Tensor, *, lambda_offdiag: float = 5e-3,
                 eps: float = 1e-5, gather: bool = False) -> Tensor:
    """Barlow Twins (Zbontar et al., 2021).

    Each feature is standardised over the batch, ``zn = (z - mean) / sqrt(var + eps)``
    (biased variance, as the reference's affine-free BatchNorm), then

        C = z1n.T @ z2n / N                                  (D, D) cross-correlation
        loss = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2

    Args:
        z1, z2: (N, D) projections of two views, N >= 2.
        lambda_offdiag: >= 0, weight of the redundancy term (paper: 5e-3).
        eps: > 0, added to the variance (BatchNorm's 1e-5) so constant features give 0.
        gather: under ``torch.distributed``, mean, variance and C are over every rank's
            rows (the module docstring); every rank must pass the same N.

    Returns:
        Scalar loss; 0 only when the views' features are perfectly correlated per
        dimension and uncorrelated across dimensions.
    """
    z1, z2 = check_pair(z1, z2, "z1", "z2", min_rows=2)
    check_nonnegative(lambda_offdiag, "lambda_offdiag")
    check_positive_scalar(eps, "eps")
    gathering, _ = check_gather(gather, False)
    if not gathering:
        n = z1.shape[0]
        z1n = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
        z2n = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
        c = z1n.T @ z2n / n
    else:
        # sums over the global batch (two passes for the variance, as torch.var)
        n = z1.shape[0] * world_size(True)
        sum1, sum2 = reduce_sums([z1.sum(0), z2.sum(0)], True)
        z1c, z2c = z1 - sum1 / n, z2 - sum2 / n
        sq1, sq2 = reduce_sums([z1c.pow(2).sum(0), z2c.pow(2).sum(0)], True)
        z1n = z1c / torch.sqrt(sq1 / n + eps)
        z2n = z2c / torch.sqrt(sq2 / n + eps)
        (c,) = reduce_sums([z1n.T @ z2n], True)
        c = c / n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


class VicregTerms(NamedTuple):
    """The three unweighted VICReg terms, each a scalar tensor (for logging)."""

    invariance: Tensor
    variance: Tensor
    covariance: Tensor


def vicreg_terms(z1: Tensor, z2: Tensor, *, eps: float = 1e-4,
                 gather: bool = False) -> VicregTerms:
    """The unweighted terms of VICReg (Bardes et al., 2022), as in the reference code.

        invariance = mean_{n,d} (z1 - z2)^2
        variance   = (mean_d relu(1 - std(z1)_d) + mean_d relu(1 - std(z2)_d)) / 2,
                     std = sqrt(var_unbiased + eps), target gamma = 1
        covariance = sum_{i != j} cov(z1)_ij^2 / D + sum_{i != j} cov(z2)_ij^2 / D

    Args:
        z1, z2: (N, D) expander outputs of two views, N >= 2.
        eps: > 0 inside the square root of the variance.
        gather: under ``torch.distributed``, every term is over every rank's rows (the
            module docstring): N is the global batch; every rank must pass the same N.
    """
    z1, z2 = check_pair(z1, z2, "z1", "z2", min_rows=2)
    check_positive_scalar(eps, "eps")
    gathering, _ = check_gather(gather, False)
    n, d = z1.shape
    if not gathering:
        invariance = F.mse_loss(z1, z2)
        centred = [z1 - z1.mean(dim=0), z2 - z2.mean(dim=0)]
        squares = [zc.pow(2).sum(0) for zc in centred]
        products = [zc.T @ zc for zc in centred]
    else:
        n = n * world_size(True)
        sums = reduce_sums([(z1 - z2).pow(2).sum(), z1.sum(0), z2.sum(0)], True)
        invariance = sums[0] / (n * d)
        centred = [z1 - sums[1] / n, z2 - sums[2] / n]
        stats = reduce_sums([zc.pow(2).sum(0) for zc in centred]
                            + [zc.T @ zc for zc in centred], True)
        squares, products = stats[:2], stats[2:]
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for square, product in zip(squares, products):
        std = torch.sqrt(square / (n - 1) + eps)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = product / (n - 1)
        covariance = covariance + _off_diagonal(cov).pow(2).sum() / d
    return VicregTerms(invariance, variance, covariance)


def vicreg(z1: Tensor, z2: Tensor, *, invariance_weight: float = 25.0,
           variance_weight: float = 25.0, covariance_weight: float = 1.0,
           eps: float = 1e-4, gather: bool = False) -> Tensor:
    """VICReg: variance-invariance-covariance regularisation (Bardes et al., 2022).

        loss = invariance_weight * invariance + variance_weight * variance
               + covariance_weight * covariance

    with the terms of :func:`vicreg_terms` (paper weights 25, 25, 1).

    Args:
        z1, z2: (N, D) expander outputs of two views, N >= 2.
        invariance_weight, variance_weight, covariance_weight: >= 0.
        eps: > 0 inside the square root of the variance.
        gather: as in :func:`vicreg_terms`.

    Returns:
        Scalar loss.
    """
    check_nonnegative(invariance_weight, "invariance_weight")
    check_nonnegative(variance_weight, "variance_weight")
    check_nonnegative(covariance_weight, "covariance_weight")
    terms = vicreg_terms(z1, z2, eps=eps, gather=gather)
    return (invariance_weight * terms.invariance + variance_weight * terms.variance
            + covariance_weight * terms.covariance)
