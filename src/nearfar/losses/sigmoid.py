"""SigLIP: the pairwise sigmoid loss for image-text pre-training (Zhai et al., 2023).

Every (image, text) pair in the batch is an independent binary problem: the N matched
pairs on the diagonal are positives (label +1), the N^2 - N others negatives (label -1).
No softmax couples the rows, so the loss is a plain sum over the N x N logits and the
exact tiled path only has to visit tiles, never hold the matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import (
    check_number,
    check_pair,
    check_positive_scalar,
    check_scalar_like,
    check_tile_size,
)

__all__ = ["siglip_loss", "SigLipParams", "SigLipTiled", "AUTO_TILE_ABOVE", "AUTO_TILE_SIZE"]

AUTO_TILE_ABOVE = 4096
"""With ``tile=None`` batches larger than this take the tiled path."""
AUTO_TILE_SIZE = 1024
"""Rows (and columns) per tile on the automatic tiled path."""


def siglip_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float,
                logit_bias: Tensor | float, *, tile: int | None = None) -> Tensor:
    """The sigmoid loss of SigLIP (Zhai et al., 2023).

    ``logits = exp(logit_scale) * img @ txt.T + logit_bias`` with img, txt the
    L2-normalised rows; labels are +1 on the diagonal and -1 elsewhere, and

        loss = -sum_ij log sigmoid(label_ij * logits_ij) / N

    normalised by the batch size N as in the paper.

    Args:
        image, text: (N, D) embeddings, N >= 2; row i of each is a matched pair.
            Normalised inside.
        logit_scale: learnable log-temperature, shape () or (1,), same dtype and device as
            ``image`` (the paper initialises it at log 10); a Python number is a constant.
        logit_bias: learnable bias, shape () or (1,) (the paper initialises it at -10).
        tile: rows / columns per tile of the exact memory-linear path; ``None`` tiles
            automatically when N > ``AUTO_TILE_ABOVE``; 0 forces the full N x N computation.
            Both paths give the same value and gradients up to rounding.

    Returns:
        Scalar loss.
    """
    image, text = check_pair(image, text, "image", "text", min_rows=2)
    logit_scale = check_scalar_like(logit_scale, "logit_scale", image, "image")
    logit_bias = check_scalar_like(logit_bias, "logit_bias", image, "image")
    check_tile_size(tile)
    n = image.shape[0]
    if tile is None:
        tile = AUTO_TILE_SIZE if n > AUTO_TILE_ABOVE else 0
    img = F.normalize(image, dim=1)
    txt = F.normalize(text, dim=1)
    if tile == 0 or tile >= n:
        logits = logit_scale.exp() * (img @ txt.T) + logit_bias
        labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
        return -F.logsigmoid(labels * logits).sum() / n
    return SigLipTiled.apply(img, txt, logit_scale, logit_bias, tile) / n


def _tile_logits(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return scale * (x @ y.T) + bias


def _tile_labels(logits: Tensor, r0: int, c0: int) -> Tensor | None:
    """The +-1 labels of tile (r0.., c0..), or None when the tile misses the diagonal
    (all labels -1)."""
    rows, cols = logits.shape
    lo, hi = max(r0, c0), min(r0 + rows, c0 + cols)
    if lo >= hi:
        return None
    labels = torch.full_like(logits, -1.0)
    k = torch.arange(lo, hi, device=logits.device)
    labels[k - r0, k - c0] = 1.0
    return labels


class SigLipTiled(torch.autograd.Function):
    """Exact tiled sum of -log sigmoid(label * logits) over the N x N logits.

    Forward visits (row-block, column-block) tiles and keeps only the running sum;
    backward recomputes each tile and uses d/dl [-log sigmoid(y l)] = -y sigmoid(-y l).
    Memory is O(N D + tile^2). Inputs: x, y (N, D) already normalised, log_scale and bias
    0-d tensors, tile a positive int. Returns the sum (not divided by N).
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, log_scale: Tensor, bias: Tensor,
                tile: int) -> Tensor:
        scale = log_scale.exp()
        n = x.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for r0 in range(0, n, tile):
            xr = x[r0:r0 + tile]
            for c0 in range(0, n, tile):
                logits = _tile_logits(xr, y[c0:c0 + tile], scale, bias)
                labels = _tile_labels(logits, r0, c0)
                signed = logits.neg() if labels is None else labels * logits
                total += F.logsigmoid(signed).sum(dtype=torch.float64)
        ctx.save_for_backward(x, y, log_scale, bias)
        ctx.tile = tile
        return (-total).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, y, log_scale, bias = ctx.saved_tensors
        tile = ctx.tile
        need_x, need_y, need_scale, need_bias = ctx.needs_input_grad[:4]
        scale = log_scale.exp()
        n = x.shape[0]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_y = torch.zeros_like(y) if need_y else None
        # d loss / d log_scale = sum(dl * scale * x y^T) = sum(dl * (logits - bias))
        grad_scale = torch.zeros((), dtype=torch.float64, device=x.device)
        grad_bias = torch.zeros((), dtype=torch.float64, device=x.device)
        for r0 in range(0, n, tile):
            xr = x[r0:r0 + tile]
            for c0 in range(0, n, tile):
                yc = y[c0:c0 + tile]
                logits = _tile_logits(xr, yc, scale, bias)
                labels = _tile_labels(logits, r0, c0)
                if labels is None:      # y = -1: d/dl = sigmoid(l)
                    dl = torch.sigmoid(logits)
                else:
                    dl = -labels * torch.sigmoid(-labels * logits)
                if need_x:
                    grad_x[r0:r0 + tile].addmm_(dl, yc)
                if need_y:
                    grad_y[c0:c0 + tile].addmm_(dl.T, xr)
                if need_scale:
                    grad_scale += (dl * (logits - bias)).sum(dtype=torch.float64)
                if need_bias:
                    grad_bias += dl.sum(dtype=torch.float64)
        g = grad_out.to(x.dtype)
        if need_x:
            grad_x.mul_(scale * g)
        if need_y:
            grad_y.mul_(scale * g)
        grad_scale = (grad_scale * grad_out).to(log_scale.dtype) if need_scale else None
        grad_bias = (grad_bias * grad_out).to(bias.dtype) if need_bias else None
        return grad_x, grad_y, grad_scale, grad_bias, None


class SigLipParams(nn.Module):
    """The two learnable scalars of SigLIP, at the paper's initialisation.

    ``logit_scale`` is log-parametrised (init log 10, so the scale starts at 10) and
    ``logit_bias`` starts at -10, which keeps the initial loss from being dominated by
    the N^2 - N negatives (Zhai et al., 2023). Calling the module computes the loss.
    """

    def __init__(self, *, init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__()
        check_positive_scalar(init_scale, "init_scale")
        check_number(init_bias, "init_bias")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image: Tensor, text: Tensor, *, tile: int | None = None) -> Tensor:
        """(N, D) image and text embeddings -> scalar loss (see :func:`siglip_loss`)."""
        return siglip_loss(image, text, self.logit_scale, self.logit_bias, tile=tile)
