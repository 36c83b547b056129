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
from .collective import all_gather_rows, check_gather, gathered_offset

__all__ = ["siglip_loss", "SigLipParams", "SigLipTiled", "AUTO_TILE_ABOVE", "AUTO_TILE_SIZE"]

AUTO_TILE_ABOVE = 4096
"""With ``tile=None`` batches larger than this take the tiled path."""
AUTO_TILE_SIZE = 1024
"""Rows (and columns) per tile on the automatic tiled path."""


def siglip_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float,
                logit_bias: Tensor | float, *, tile: int | None = None, gather: bool = False,
                local_loss: bool = False) -> Tensor:
    """The sigmoid loss of SigLIP (Zhai et al., 2023).

    ``logits = exp(logit_scale) * img @ txt.T + logit_bias`` with img, txt the
    L2-normalised rows; labels are +1 on the diagonal and -1 elsewhere, and

        loss = -sum_ij log sigmoid(label_ij * logits_ij) / N

    normalised by the batch size N as in the paper.

    Many processes (``torch.distributed``, see `nearfar.distributed`): with ``gather=True``
    the pairs of every rank are gathered with gradients (one autograd-aware all-gather
    whose backward sums over ranks) and the loss is that of one process on the
    concatenated batch. ``local_loss=False`` computes it on every rank (the same value
    everywhere); ``local_loss=True`` scores only this rank's images against every rank's
    texts (their rows ``i`` against the gathered text ``rank_offset + i`` as the
    positive), normalised by the local N: the mean over ranks is the global loss, so
    DDP's gradient averaging gives the exact global gradient with 1/W of the score
    matrix per rank. Without a process group both are no-ops.

    Args:
        image, text: (N, D) embeddings, N >= 2; row i of each is a matched pair.
            Normalised inside.
        logit_scale: learnable log-temperature, shape () or (1,), same dtype and device as
            ``image`` (the paper initialises it at log 10); a Python number is a constant.
        logit_bias: learnable bias, shape () or (1,) (the paper initialises it at -10).
        tile: rows / columns per tile of the exact memory-linear path; ``None`` tiles
            automatically when N > ``AUTO_TILE_ABOVE``; 0 forces the full N x N computation.
            Both paths give the same value and gradients up to rounding.
        gather: gather every rank's pairs (see above); every rank must pass the same N.
        local_loss: with ``gather``, score only this rank's images (see above).

    Returns:
        Scalar loss.
    """
    image, text = check_pair(image, text, "image", "text", min_rows=2)
    logit_scale = check_scalar_like(logit_scale, "logit_scale", image, "image")
    logit_bias = check_scalar_like(logit_bias, "logit_bias", image, "image")
    check_tile_size(tile)
    gathering, local = check_gather(gather, local_loss)
    offset = 0
    if gathering:
        n_local = image.shape[0]
        both = all_gather_rows(torch.stack([image, text], dim=1))
        if local:
            text = both[:, 1]
            offset = gathered_offset(n_local, True)
        else:
            image, text = both.unbind(1)
    n, m = image.shape[0], text.shape[0]
    if tile is None:
        tile = AUTO_TILE_SIZE if max(n, m) > AUTO_TILE_ABOVE else 0
    img = F.normalize(image, dim=1)
    txt = F.normalize(text, dim=1)
    if tile == 0 or tile >= max(n, m):
        logits = logit_scale.exp() * (img @ txt.T) + logit_bias
        if offset == 0 and n == m:
            labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
        else:
            labels = torch.full((n, m), -1.0, dtype=logits.dtype, device=logits.device)
            labels.diagonal(offset).fill_(1.0)
        return -F.logsigmoid(labels * logits).sum() / n
    if offset:
        return SigLipTiled.apply(img, txt, logit_scale, logit_bias, tile, offset) / n
    return SigLipTiled.apply(img, txt, logit_scale, logit_bias, tile) / n


def _diagonal(r0: int, c0: int, rows: int, cols: int, device: torch.device,
              offset: int = 0) -> tuple[Tensor, Tensor] | None:
    """Tile-local (row, col) indices of the positives (k, k + offset) inside tile
    (r0.., c0..), or None when the tile misses them (every label there is -1)."""
    lo, hi = max(r0, c0 - offset), min(r0 + rows, c0 + cols - offset)
    if lo >= hi:
        return None
    k = torch.arange(lo, hi, device=device)
    return k - r0, k + offset - c0


class SigLipTiled(torch.autograd.Function):
    """Exact tiled sum of -log sigmoid(label * logits) over the N x M logits.

    Forward visits (row-block, column-block) tiles and keeps only the running sum;
    backward recomputes each tile and uses d/dl [-log sigmoid(y l)] = -y sigmoid(-y l),
    i.e. sigmoid(l) off the positives and -sigmoid(-l) on them. Memory is O(N D + tile^2).

    Inputs: x (N, D), y (M, D) (normalised by the caller), log_scale and bias 0-d tensors,
    tile a positive int, and optionally ``offset`` (default 0): the positives are
    (i, i + offset), the diagonal for N = M (``offset`` is this rank's row offset when y
    holds the texts of every rank). Returns the sum (not divided by N). With
    G = dL/dlogits @ y summed over tiles: dx = scale G, dy = sum of dL/dlogits^T @
    (scale x), d log_scale = sum(G * scale x).
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, log_scale: Tensor, bias: Tensor,
                tile: int, offset: int = 0) -> Tensor:
        xs = x * log_scale.exp()
        n, m = x.shape[0], y.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for r0 in range(0, n, tile):
            xr = xs[r0:r0 + tile]
            for c0 in range(0, m, tile):
                yc = y[c0:c0 + tile]
                signed = torch.addmm(bias, xr, yc.T).neg_()      # label -1 ...
                diag = _diagonal(r0, c0, len(xr), len(yc), x.device, offset)
                if diag is not None:
                    signed[diag] = signed[diag].neg()            # ... but +1 on the positives
                total += F.logsigmoid(signed).sum()
        ctx.save_for_backward(x, y, log_scale, bias)
        ctx.tile, ctx.offset = tile, offset
        return (-total).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, y, log_scale, bias = ctx.saved_tensors
        tile, offset = ctx.tile, ctx.offset
        need_x, need_y, need_scale, need_bias = ctx.needs_input_grad[:4]
        scale = log_scale.exp()
        xs = x * scale
        n, m = x.shape[0], y.shape[0]
        g_rows = torch.zeros_like(x) if (need_x or need_scale) else None   # G = dl @ y
        grad_y = torch.zeros_like(y) if need_y else None
        grad_bias = torch.zeros((), dtype=torch.float64, device=x.device)
        for r0 in range(0, n, tile):
            xr = xs[r0:r0 + tile]
            for c0 in range(0, m, tile):
                yc = y[c0:c0 + tile]
                logits = torch.addmm(bias, xr, yc.T)
                diag = _diagonal(r0, c0, len(xr), len(yc), x.device, offset)
                on_diag = None if diag is None else -torch.sigmoid(-logits[diag])
                dl = logits.sigmoid_()                           # label -1: sigmoid(l)
                if diag is not None:
                    dl[diag] = on_diag                           # label +1: -sigmoid(-l)
                if g_rows is not None:
                    g_rows[r0:r0 + tile].addmm_(dl, yc)
                if need_y:
                    grad_y[c0:c0 + tile].addmm_(dl.T, xr)
                if need_bias:
                    grad_bias += dl.sum()
        grad_x = grad_scale = None
        if need_scale:
            grad_scale = ((g_rows * xs).sum(dtype=torch.float64) * grad_out).to(log_scale.dtype)
        if need_x:
            grad_x = g_rows.mul_(scale * grad_out)
        if need_y:
            grad_y.mul_(grad_out)
        grad_bias = (grad_bias * grad_out).to(bias.dtype) if need_bias else None
        # one None per non-tensor input actually passed (tile, and offset when given)
        extra = len(ctx.needs_input_grad) - 4
        return (grad_x, grad_y, grad_scale, grad_bias) + (None,) * extra


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

    def forward(self, image: Tensor, text: Tensor, *, tile: int | None = None,
                gather: bool = False, local_loss: bool = False) -> Tensor:
        """(N, D) image and text embeddings -> scalar loss (see :func:`siglip_loss`)."""
        return siglip_loss(image, text, self.logit_scale, self.logit_bias, tile=tile,
                           gather=gather, local_loss=local_loss)
