"""The exact, memory-linear InfoNCE: scores are made, used and dropped one tile at a time.

For anchors ``a`` (N, D), candidates ``c`` (M, D) and an inverse temperature ``scale`` the
score of anchor i for candidate j is ``s_ij = scale * a_i . c_j``. `TiledInfoNCE` returns,
per anchor,

    lse_i - pos_i,   lse_i = log sum_{j not excluded} exp(s_ij),
                     pos_i = 1/|P(i)| sum_{j in P(i)} s_ij   (0 when P comes from outside)

without holding the N x M score matrix:

* forward walks (row block x column block) tiles, keeps a running max and a running sum
  of exponentials per anchor (online log-sum-exp), and the per-anchor positive score sums;
* backward recomputes each tile's scores, turns them into softmax weights with the saved
  ``lse`` and accumulates ``dL/da = scale * G c``, ``dL/dc = scale * G^T a`` and
  ``dL/dscale = sum_ij G_ij a_i . c_j`` where ``G = g_i (softmax_ij - [j in P(i)]/|P(i)|)``.

Peak memory is O((N + M) D + rows * cols) instead of O(N M). Positives that are cheap to
score directly (a single index per anchor, class sums of labels) are left to the caller and
ordinary autograd; only positives that need an (N, M) pattern (a boolean mask, or labels
together with an exclusion mask) are compared here, tile by tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows / columns per tile when the caller does not say. Chosen from measurements on CPU
# (see the module docstring of nearfar.losses.infonce): tiles of ~1-4 MiB stay in cache.
DEFAULT_TILE_CPU = 1024
DEFAULT_TILE_CUDA = 4096


def default_tile(device: torch.device) -> int:
    return DEFAULT_TILE_CUDA if device.type == "cuda" else DEFAULT_TILE_CPU


@dataclass(frozen=True, eq=False)
class TilePlan:
    """What the tiles need besides the embeddings.

    rows, cols: tile size (anchor rows x candidate columns).
    exclude_self: candidate i is never scored by anchor i (needs N <= M).
    exclude_mask: bool (N, M), True = never scored (sliced per tile).
    positive_mask: bool (N, M) positives, sliced per tile; or
    anchor_labels (N,), candidate_labels (M,): positives are equal labels, compared per tile.
    positive_counts: (N,) number of non-excluded positives per anchor (all >= 1), needed with
        either form of tile positives.
    """

    rows: int
    cols: int
    exclude_self: bool = False
    exclude_mask: Tensor | None = None
    positive_mask: Tensor | None = None
    anchor_labels: Tensor | None = None
    candidate_labels: Tensor | None = None
    positive_counts: Tensor | None = None

    @property
    def has_tile_positives(self) -> bool:
        return self.positive_mask is not None or self.anchor_labels is not None


def positive_tile(plan: TilePlan, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
    """Bool (i1 - i0, j1 - j0): positives of this tile with excluded entries removed (a new
    tensor, never a view of the caller's mask), or None when positives are not tile-wise."""
    if plan.positive_mask is not None:
        w = plan.positive_mask[i0:i1, j0:j1]
    elif plan.anchor_labels is not None:
        return _drop_excluded(
            plan.anchor_labels[i0:i1, None] == plan.candidate_labels[None, j0:j1],
            plan, i0, i1, j0, j1, fresh=True)
    else:
        return None
    return _drop_excluded(w, plan, i0, i1, j0, j1, fresh=False)


def _drop_excluded(w: Tensor, plan: TilePlan, i0: int, i1: int, j0: int, j1: int, *,
                   fresh: bool) -> Tensor:
    if plan.exclude_mask is not None:
        w = w & ~plan.exclude_mask[i0:i1, j0:j1]
    elif not fresh:
        w = w.clone()
    if plan.exclude_self:
        w.diagonal(i0 - j0).fill_(False)
    return w


def count_tile_positives(plan: TilePlan, n: int, m: int, device: torch.device) -> Tensor:
    """(N,) int64: non-excluded positives per anchor, counted tile by tile."""
    counts = torch.zeros(n, dtype=torch.int64, device=device)
    for i0 in range(0, n, plan.rows):
        i1 = min(i0 + plan.rows, n)
        for j0 in range(0, m, plan.cols):
            j1 = min(j0 + plan.cols, m)
            counts[i0:i1] += positive_tile(plan, i0, i1, j0, j1).sum(1)
    return counts


def _exclude_(scores: Tensor, plan: TilePlan, i0: int, i1: int, j0: int, j1: int,
              value: float) -> None:
    if plan.exclude_mask is not None:
        scores.masked_fill_(plan.exclude_mask[i0:i1, j0:j1], value)
    if plan.exclude_self:
        scores.diagonal(i0 - j0).fill_(value)


class TiledInfoNCE(torch.autograd.Function):
    """Per-anchor ``lse_i - pos_i`` (see the module docstring), exact, tile by tile.

    Inputs: anchors (N, D), candidates (M, D) (may be the same tensor), scale (0-d tensor,
    the inverse temperature, may require grad) and a `TilePlan`. Output: (N,).
    Every anchor must have at least one non-excluded candidate. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, candidates: Tensor, scale: Tensor, plan: TilePlan
                ) -> Tensor:
        n, m = anchors.shape[0], candidates.shape[0]
        rows, cols = min(plan.rows, n), min(plan.cols, m)
        scaled = anchors * scale.detach()           # scores of a tile in one matmul
        cand_t = candidates.detach().t()
        buffer = anchors.new_empty(rows * cols)     # reused by every tile
        lse = anchors.new_empty(n)
        pos = anchors.new_zeros(n) if plan.has_tile_positives else None
        neg_inf = float("-inf")
        with torch.no_grad():
            for i0 in range(0, n, rows):
                i1 = min(i0 + rows, n)
                r = i1 - i0
                a = scaled[i0:i1]
                run_max = anchors.new_full((r,), neg_inf)
                run_sum = anchors.new_zeros(r)   # sum of exp(s - ref), ref = run_max or 0
                for j0 in range(0, m, cols):
                    j1 = min(j0 + cols, m)
                    s = torch.mm(a, cand_t[:, j0:j1], out=buffer[: r * (j1 - j0)].view(r, -1))
                    w = positive_tile(plan, i0, i1, j0, j1)
                    if w is not None:
                        pos[i0:i1] += torch.where(w, s, 0.0).sum(1)
                    _exclude_(s, plan, i0, i1, j0, j1, neg_inf)
                    new_max = torch.maximum(run_max, s.amax(1))
                    ref = new_max.masked_fill(new_max == neg_inf, 0.0)
                    run_sum.mul_(torch.exp(run_max - ref))    # 0 while nothing was scored
                    run_max = new_max
                    run_sum += s.sub_(ref[:, None]).exp_().sum(1)
                lse[i0:i1] = ref + run_sum.log()
        if pos is not None:
            out = lse - pos / plan.positive_counts
        else:
            out = lse.clone()
        ctx.plan = plan
        ctx.save_for_backward(anchors, candidates, scale, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        anchors, candidates, scale, lse = ctx.saved_tensors
        plan: TilePlan = ctx.plan
        need_a, need_c, need_scale = ctx.needs_input_grad[:3]
        n, m = anchors.shape[0], candidates.shape[0]
        rows, cols = min(plan.rows, n), min(plan.cols, m)
        sc = scale.detach()
        scaled = anchors * sc
        cand_t = candidates.t()
        g = grad_out.to(anchors.dtype).contiguous()
        if plan.has_tile_positives:
            pos_weight = g / plan.positive_counts      # g_i / |P(i)|
        grad_a = torch.zeros_like(anchors) if (need_a or need_scale) else None
        grad_c = torch.zeros_like(candidates) if need_c else None
        buffer = anchors.new_empty(rows * cols)
        neg_lse = -lse
        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            r = i1 - i0
            g_rows = g[i0:i1, None]
            for j0 in range(0, m, cols):
                j1 = min(j0 + cols, m)
                tile = buffer[: r * (j1 - j0)].view(r, -1)
                # softmax weights of the tile: exp(s - lse), excluded entries 0
                p = torch.addmm(neg_lse[i0:i1, None], scaled[i0:i1], cand_t[:, j0:j1], out=tile)
                p.exp_()
                _exclude_(p, plan, i0, i1, j0, j1, 0.0)
                p.mul_(g_rows)                      # G = g_i p_ij - g_i [j in P(i)] / |P(i)|
                w = positive_tile(plan, i0, i1, j0, j1)
                if w is not None:
                    p.sub_(w * pos_weight[i0:i1, None])
                if grad_a is not None:
                    grad_a[i0:i1].addmm_(p, candidates[j0:j1])
                if grad_c is not None:
                    grad_c[j0:j1].addmm_(p.t(), anchors[i0:i1])
        grad_scale = None
        if need_scale:
            # sum_ij G_ij a_i . c_j = sum_i a_i . (G c)_i
            grad_scale = (grad_a * anchors).sum().reshape(scale.shape).to(scale.dtype)
        if need_a:
            grad_a.mul_(sc)
        else:
            grad_a = None
        if grad_c is not None:
            grad_c.mul_(sc)
        return grad_a, grad_c, grad_scale, None


def tiled_info_nce(anchors: Tensor, candidates: Tensor, scale: Tensor, plan: TilePlan
                   ) -> Tensor:
    """Per-anchor ``lse_i - pos_i`` (N,), exact, memory-linear; see `TiledInfoNCE`."""
    return TiledInfoNCE.apply(anchors, candidates, scale, plan)
