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
              value: float, *, transposed: bool = False) -> None:
    """Set the excluded entries of the tile (anchors i0:i1 x candidates j0:j1) to value.
    transposed: the tile is (candidates i0:i1 x anchors j0:j1)^T, i.e. entry (k, l) pairs
    anchor j0 + l with candidate i0 + k (the mirrored tile of a symmetric problem)."""
    if plan.exclude_mask is not None:
        if transposed:
            scores.masked_fill_(plan.exclude_mask[j0:j1, i0:i1].t(), value)
        else:
            scores.masked_fill_(plan.exclude_mask[i0:i1, j0:j1], value)
    if plan.exclude_self:
        scores.diagonal(i0 - j0).fill_(value)   # the same entries in either orientation


def _mirrored_positive_tile(plan: TilePlan, i0: int, i1: int, j0: int, j1: int
                            ) -> Tensor | None:
    w = positive_tile(plan, j0, j1, i0, i1)
    return None if w is None else w.t()


def _accumulate_(scores: Tensor, dim: int, run_max: Tensor, run_sum: Tensor) -> None:
    """Online log-sum-exp: fold the tile's scores along dim into the running max and the
    running sum of exp(score - ref) (ref = running max, or 0 while nothing was scored).
    Consumes scores (overwritten in place)."""
    new_max = torch.maximum(run_max, scores.amax(dim))
    ref = new_max.masked_fill(new_max == float("-inf"), 0.0)
    run_sum.mul_(torch.exp(run_max - ref))          # 0 while nothing was scored
    run_max.copy_(new_max)
    scores.sub_(ref[:, None] if dim == 1 else ref[None, :])
    run_sum += scores.exp_().sum(dim)


def _finish_lse(run_max: Tensor, run_sum: Tensor) -> Tensor:
    return run_max.masked_fill(run_max == float("-inf"), 0.0) + run_sum.log()


def _blocks(n: int, size: int):
    for i0 in range(0, n, size):
        yield i0, min(i0 + size, n)


class TiledInfoNCE(torch.autograd.Function):
    """Per-anchor ``lse_i - pos_i`` (see the module docstring), exact, tile by tile.

    Inputs: anchors (N, D), candidates (M, D), scale (0-d tensor, the inverse temperature,
    may require grad) and a `TilePlan`. Output: (N,). Every anchor must have at least one
    non-excluded candidate. Not twice differentiable. When anchors and candidates are one
    tensor, `SymmetricTiledInfoNCE` does the same with half the matrix products.
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, candidates: Tensor, scale: Tensor, plan: TilePlan
                ) -> Tensor:
        n, m = anchors.shape[0], candidates.shape[0]
        rows, cols = min(plan.rows, n), min(plan.cols, m)
        scaled = anchors * scale               # a tile's scores in one matrix product
        cand_t = candidates.t()
        buffer = anchors.new_empty(rows * cols)     # reused by every tile
        run_max = anchors.new_full((n,), float("-inf"))
        run_sum = anchors.new_zeros(n)
        pos = anchors.new_zeros(n) if plan.has_tile_positives else None
        for i0, i1 in _blocks(n, rows):
            for j0, j1 in _blocks(m, cols):
                s = torch.mm(scaled[i0:i1], cand_t[:, j0:j1],
                             out=buffer[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0))
                w = positive_tile(plan, i0, i1, j0, j1)
                if w is not None:
                    pos[i0:i1] += torch.where(w, s, 0.0).sum(1)
                _exclude_(s, plan, i0, i1, j0, j1, float("-inf"))
                _accumulate_(s, 1, run_max[i0:i1], run_sum[i0:i1])
        lse = _finish_lse(run_max, run_sum)
        ctx.plan = plan
        ctx.save_for_backward(anchors, candidates, scale, lse)
        return lse.clone() if pos is None else lse - pos / plan.positive_counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        anchors, candidates, scale, lse = ctx.saved_tensors
        plan: TilePlan = ctx.plan
        need_a, need_c, need_scale = ctx.needs_input_grad[:3]
        n, m = anchors.shape[0], candidates.shape[0]
        rows, cols = min(plan.rows, n), min(plan.cols, m)
        scaled = anchors * scale
        cand_t = candidates.t()
        g = grad_out.to(anchors.dtype).contiguous()
        pos_weight = g / plan.positive_counts if plan.has_tile_positives else None
        grad_a = torch.zeros_like(anchors) if (need_a or need_scale) else None  # sum_j G_ij c_j
        grad_c = torch.zeros_like(candidates) if need_c else None             # sum_i G_ij a_i
        buffer = anchors.new_empty(rows * cols)
        neg_lse = -lse
        for i0, i1 in _blocks(n, rows):
            for j0, j1 in _blocks(m, cols):
                tile = buffer[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
                # G_ij = g_i softmax_ij - g_i [j in P(i)] / |P(i)|, excluded entries 0
                p = torch.addmm(neg_lse[i0:i1, None], scaled[i0:i1], cand_t[:, j0:j1], out=tile)
                p.exp_()
                _exclude_(p, plan, i0, i1, j0, j1, 0.0)
                p.mul_(g[i0:i1, None])
                w = positive_tile(plan, i0, i1, j0, j1)
                if w is not None:
                    p.sub_(w * pos_weight[i0:i1, None])
                if grad_a is not None:
                    grad_a[i0:i1].addmm_(p, candidates[j0:j1])
                if grad_c is not None:
                    grad_c[j0:j1].addmm_(p.t(), anchors[i0:i1])
        return _finish_grads(grad_a, grad_c, anchors, scale, need_a, need_scale) + (None,)


def _finish_grads(grad_a: Tensor | None, grad_c: Tensor | None, anchors: Tensor, scale: Tensor,
                  need_a: bool, need_scale: bool, *, symmetric: bool = False):
    """From the unscaled sums G c (grad_a) and G^T a (grad_c) to the gradients of anchors,
    candidates and scale: dL/dscale = sum_ij G_ij a_i . c_j = sum_i a_i . (G c)_i (halved
    when grad_a holds (G + G^T) z, the symmetric case)."""
    grad_scale = None
    if need_scale:
        total = (grad_a * anchors).sum()
        grad_scale = (total / 2 if symmetric else total).reshape(scale.shape).to(scale.dtype)
    if need_a:
        grad_a.mul_(scale)
    else:
        grad_a = None
    if grad_c is not None:
        grad_c.mul_(scale)
    return grad_a, grad_c, grad_scale


class SymmetricTiledInfoNCE(torch.autograd.Function):
    """`TiledInfoNCE` with anchors = candidates = z (N, D): the score matrix is symmetric,
    so each off-diagonal tile is computed once and used twice, by its rows (anchors of the
    row block) and by its columns (anchors of the column block). Same values and gradients,
    about half the matrix products. Needs square tiles (plan.rows == plan.cols); the
    exclusion and positive masks need not be symmetric.
    """

    @staticmethod
    def forward(ctx, z: Tensor, scale: Tensor, plan: TilePlan) -> Tensor:
        n = z.shape[0]
        size = min(plan.rows, n)
        scaled = z * scale
        z_t = z.t()
        buffer = z.new_empty(2 * size * size)
        run_max = z.new_full((n,), float("-inf"))
        run_sum = z.new_zeros(n)
        pos = z.new_zeros(n) if plan.has_tile_positives else None
        for i0, i1 in _blocks(n, size):
            for j0, j1 in _blocks(n, size):
                if j0 < i0:
                    continue                    # its mirror (i0 <-> j0) covers it
                r, c = i1 - i0, j1 - j0
                s = torch.mm(scaled[i0:i1], z_t[:, j0:j1], out=buffer[: r * c].view(r, c))
                mirror = None
                if j0 != i0:                    # the same scores seen by anchors j0:j1
                    mirror = buffer[r * c: 2 * r * c].view(r, c).copy_(s)
                if pos is not None:
                    w = positive_tile(plan, i0, i1, j0, j1)
                    pos[i0:i1] += torch.where(w, s, 0.0).sum(1)
                    if mirror is not None:
                        w = _mirrored_positive_tile(plan, i0, i1, j0, j1)
                        pos[j0:j1] += torch.where(w, mirror, 0.0).sum(0)
                _exclude_(s, plan, i0, i1, j0, j1, float("-inf"))
                _accumulate_(s, 1, run_max[i0:i1], run_sum[i0:i1])
                if mirror is not None:
                    _exclude_(mirror, plan, i0, i1, j0, j1, float("-inf"), transposed=True)
                    _accumulate_(mirror, 0, run_max[j0:j1], run_sum[j0:j1])
        lse = _finish_lse(run_max, run_sum)
        ctx.plan = plan
        ctx.save_for_backward(z, scale, lse)
        return lse.clone() if pos is None else lse - pos / plan.positive_counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        z, scale, lse = ctx.saved_tensors
        plan: TilePlan = ctx.plan
        need_z, need_scale = ctx.needs_input_grad[:2]
        n = z.shape[0]
        size = min(plan.rows, n)
        scaled = z * scale
        z_t = z.t()
        g = grad_out.to(z.dtype).contiguous()
        pos_weight = g / plan.positive_counts if plan.has_tile_positives else None
        grad = torch.zeros_like(z)              # sum_j (G_ij + G_ji) z_j
        buffer = z.new_empty(2 * size * size)
        neg_lse = -lse
        for i0, i1 in _blocks(n, size):
            for j0, j1 in _blocks(n, size):
                if j0 < i0:
                    continue
                r, c = i1 - i0, j1 - j0
                p = buffer[: r * c].view(r, c)
                q = None
                if j0 == i0:        # rows: G_IJ = g_I (exp(s - lse_I) - [P] / |P|)
                    torch.addmm(neg_lse[i0:i1, None], scaled[i0:i1], z_t[:, j0:j1], out=p)
                else:               # columns: (G_JI)^T = g_J (exp(s - lse_J) - [P^T] / |P|)
                    torch.mm(scaled[i0:i1], z_t[:, j0:j1], out=p)
                    q = torch.add(p, neg_lse[None, j0:j1], out=buffer[r * c: 2 * r * c].view(r, c))
                    p.add_(neg_lse[i0:i1, None])
                p.exp_()
                _exclude_(p, plan, i0, i1, j0, j1, 0.0)
                p.mul_(g[i0:i1, None])
                if pos_weight is not None:
                    p.sub_(positive_tile(plan, i0, i1, j0, j1) * pos_weight[i0:i1, None])
                if q is None:       # diagonal block: z_I is on both sides of s
                    grad[i0:i1].addmm_(p, z[j0:j1]).addmm_(p.t(), z[i0:i1])
                    continue
                q.exp_()
                _exclude_(q, plan, i0, i1, j0, j1, 0.0, transposed=True)
                q.mul_(g[None, j0:j1])
                if pos_weight is not None:
                    q.sub_(_mirrored_positive_tile(plan, i0, i1, j0, j1)
                           * pos_weight[None, j0:j1])
                p.add_(q)           # H = G_IJ + G_JI^T
                grad[i0:i1].addmm_(p, z[j0:j1])
                grad[j0:j1].addmm_(p.t(), z[i0:i1])
        grad_z, _, grad_scale = _finish_grads(grad, None, z, scale, need_z, need_scale,
                                              symmetric=True)
        return grad_z, grad_scale, None


class TiledLogSumExpBothWays(torch.autograd.Function):
    """Row and column log-sum-exp of the scores ``scale * a c^T`` from one pass over its
    tiles: (lse_rows (N,), lse_cols (M,)). Each tile is computed once and used by both
    directions (CLIP's image->text and text->image), so forward and backward together take
    three matrix products per tile instead of eight for two separate `TiledInfoNCE` calls.
    No exclusions, no tile positives.
    """

    @staticmethod
    def forward(ctx, a: Tensor, c: Tensor, scale: Tensor, size: int):
        n, m = a.shape[0], c.shape[0]
        rows, cols = min(size, n), min(size, m)
        scaled = a * scale
        c_t = c.t()
        buffer = a.new_empty(2 * rows * cols)
        row_max, row_sum = a.new_full((n,), float("-inf")), a.new_zeros(n)
        col_max, col_sum = a.new_full((m,), float("-inf")), a.new_zeros(m)
        for i0, i1 in _blocks(n, rows):
            for j0, j1 in _blocks(m, cols):
                r, k = i1 - i0, j1 - j0
                s = torch.mm(scaled[i0:i1], c_t[:, j0:j1], out=buffer[: r * k].view(r, k))
                mirror = buffer[r * k: 2 * r * k].view(r, k).copy_(s)
                _accumulate_(s, 1, row_max[i0:i1], row_sum[i0:i1])
                _accumulate_(mirror, 0, col_max[j0:j1], col_sum[j0:j1])
        lse_rows, lse_cols = _finish_lse(row_max, row_sum), _finish_lse(col_max, col_sum)
        ctx.size = size
        ctx.save_for_backward(a, c, scale, lse_rows, lse_cols)
        return lse_rows, lse_cols

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows: Tensor | None, grad_cols: Tensor | None):
        a, c, scale, lse_rows, lse_cols = ctx.saved_tensors
        need_a, need_c, need_scale = ctx.needs_input_grad[:3]
        n, m = a.shape[0], c.shape[0]
        rows, cols = min(ctx.size, n), min(ctx.size, m)
        scaled = a * scale
        c_t = c.t()
        g_rows = a.new_zeros(n) if grad_rows is None else grad_rows.to(a.dtype).contiguous()
        g_cols = a.new_zeros(m) if grad_cols is None else grad_cols.to(a.dtype).contiguous()
        grad_a = torch.zeros_like(a) if (need_a or need_scale) else None
        grad_c = torch.zeros_like(c) if need_c else None
        buffer = a.new_empty(2 * rows * cols)
        neg_rows, neg_cols = -lse_rows, -lse_cols
        for i0, i1 in _blocks(n, rows):
            for j0, j1 in _blocks(m, cols):
                r, k = i1 - i0, j1 - j0
                # dL/ds_ij = g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j)
                p = torch.mm(scaled[i0:i1], c_t[:, j0:j1], out=buffer[: r * k].view(r, k))
                q = torch.add(p, neg_cols[None, j0:j1], out=buffer[r * k: 2 * r * k].view(r, k))
                p.add_(neg_rows[i0:i1, None]).exp_().mul_(g_rows[i0:i1, None])
                p.add_(q.exp_().mul_(g_cols[None, j0:j1]))
                if grad_a is not None:
                    grad_a[i0:i1].addmm_(p, c[j0:j1])
                if grad_c is not None:
                    grad_c[j0:j1].addmm_(p.t(), a[i0:i1])
        return _finish_grads(grad_a, grad_c, a, scale, need_a, need_scale) + (None,)


def tiled_logsumexp_both_ways(a: Tensor, c: Tensor, scale: Tensor, size: int
                              ) -> tuple[Tensor, Tensor]:
    """(N,) and (M,): log sum_j exp(scale a_i . c_j) and log sum_i exp(scale a_i . c_j),
    exact, memory-linear, one pass over size x size tiles for both."""
    return TiledLogSumExpBothWays.apply(a, c, scale, size)


def tiled_info_nce(anchors: Tensor, candidates: Tensor, scale: Tensor, plan: TilePlan
                   ) -> Tensor:
    """Per-anchor ``lse_i - pos_i`` (N,), exact, memory-linear; see `TiledInfoNCE`. One
    tensor on both sides (nt_xent, supcon) takes `SymmetricTiledInfoNCE`."""
    if anchors is candidates and plan.rows == plan.cols:
        return SymmetricTiledInfoNCE.apply(anchors, scale, plan)
    return TiledInfoNCE.apply(anchors, candidates, scale, plan)
