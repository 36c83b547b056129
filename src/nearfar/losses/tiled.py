"""The exact, memory-linear InfoNCE: scores are made, used and dropped one tile at a time.

For anchors ``a`` (N, D), candidates ``c`` (M, D) and an inverse temperature ``scale`` the
score of anchor i for candidate j is ``s_ij = scale * a_i . c_j``. `TiledInfoNCE` returns,
per anchor,

    lse_i - pos_i,   lse_i = log sum_{j not excluded} exp(s_ij),
                     pos_i = 1/|P(i)| sum_{j in P(i)} s_ij   (0 without positives)

without holding the N x M score matrix:

* forward walks (row block x column block) tiles, keeps a running max and a running sum
  of exponentials per anchor (online log-sum-exp), and the per-anchor positive score sums;
* backward recomputes each tile's scores, turns them into
  ``G_ij = g_i (softmax_ij - [j in P(i)] / |P(i)|)`` with the saved ``lse`` and accumulates
  ``dL/da = scale * G c``, ``dL/dc = scale * G^T a`` and
  ``dL/dscale = sum_ij G_ij a_i . c_j = sum_i a_i . (G c)_i``.

Positives are a single column per anchor (``positive_index``: scored directly in the forward
pass, subtracted inside the tile in the backward pass, so ``softmax - 1`` cancels exactly as
in ``F.cross_entropy``) or an (N, M) pattern compared tile by tile (a boolean mask, or labels
of both sides). Label positives without an exclusion mask need no tiles at all: the caller
scores them from per-class sums.

`SymmetricTiledInfoNCE` serves one tensor on both sides (nt_xent, supcon): the score matrix
is symmetric, so each off-diagonal tile is computed once and used by its rows and by its
columns, about half the matrix products. `TiledLogSumExpBothWays` does the same for CLIP's
two directions over one image x text matrix.

Peak memory is O((N + M) D + rows * cols) instead of O(N M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows / columns per tile when the caller does not say; see nearfar.losses.infonce for the
# measurements. 1024 x 1024 float32 tiles (4 MiB) keep the per-op overhead small and stay
# near the cache; 512 is ~10% faster on one quiet core, 1024 holds up better with several
# threads or a busy machine. GPUs want bigger tiles.
DEFAULT_TILE_CPU = 1024
DEFAULT_TILE_CUDA = 4096


def default_tile(device: torch.device) -> int:
    return DEFAULT_TILE_CUDA if device.type == "cuda" else DEFAULT_TILE_CPU


@dataclass(frozen=True, eq=False)
class TilePlan:
    """What the tiles need besides the embeddings.

    rows, cols: tile size (anchor rows x candidate columns).
    exclude_self: candidate i + self_offset is never scored by anchor i (needs
        N + self_offset <= M).
    self_offset: where the anchors sit among the candidates: 0 when anchors and candidates
        are the same rows; ``rank_offset`` when this rank's anchors are scored against
        candidates gathered from every rank (nearfar.distributed).
    exclude_mask: bool (N, M), True = never scored (sliced per tile).
    Positives, at most one of:
    positive_index: int64 (N,), the single positive column of each anchor (not excluded);
    positive_mask: bool (N, M), sliced per tile;
    anchor_labels (N,), candidate_labels (M,): positives are equal labels, compared per tile.
    positive_counts: (N,) number of non-excluded positives per anchor (all >= 1), needed with
        the mask or label form.
    """

    rows: int
    cols: int
    exclude_self: bool = False
    self_offset: int = 0
    exclude_mask: Tensor | None = None
    positive_index: Tensor | None = None
    positive_mask: Tensor | None = None
    anchor_labels: Tensor | None = None
    candidate_labels: Tensor | None = None
    positive_counts: Tensor | None = None

    @property
    def has_tile_positives(self) -> bool:
        return self.positive_mask is not None or self.anchor_labels is not None


def positive_tile(plan: TilePlan, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
    """Bool (i1 - i0, j1 - j0): mask / label positives of this tile with excluded entries
    removed (a new tensor, never a view of the caller's mask); None for other plans."""
    if plan.positive_mask is not None:
        return _drop_excluded(plan.positive_mask[i0:i1, j0:j1], plan, i0, j0, fresh=False)
    if plan.anchor_labels is not None:
        same = plan.anchor_labels[i0:i1, None] == plan.candidate_labels[None, j0:j1]
        return _drop_excluded(same, plan, i0, j0, fresh=True)
    return None


def _drop_excluded(w: Tensor, plan: TilePlan, i0: int, j0: int, *, fresh: bool) -> Tensor:
    if plan.exclude_mask is not None:
        w = w & ~plan.exclude_mask[i0:i0 + w.shape[0], j0:j0 + w.shape[1]]
    elif not fresh:
        w = w.clone()
    if plan.exclude_self:
        w.diagonal(i0 + plan.self_offset - j0).fill_(False)
    return w


def count_tile_positives(plan: TilePlan, n: int, m: int, device: torch.device) -> Tensor:
    """(N,) int64: non-excluded mask / label positives per anchor, counted tile by tile."""
    counts = torch.zeros(n, dtype=torch.int64, device=device)
    for i0, i1 in _blocks(n, plan.rows):
        for j0, j1 in _blocks(m, plan.cols):
            counts[i0:i1] += positive_tile(plan, i0, i1, j0, j1).sum(1)
    return counts


def _exclude_(scores: Tensor, plan: TilePlan, i0: int, i1: int, j0: int, j1: int,
              value: float, *, transposed: bool = False) -> None:
    """Set the excluded entries of the tile (anchors i0:i1 x candidates j0:j1) to value.
    transposed: the tile is (anchors j0:j1 x candidates i0:i1)^T, i.e. entry (k, l) pairs
    anchor j0 + l with candidate i0 + k (the mirrored tile of a symmetric problem)."""
    if plan.exclude_mask is not None:
        if transposed:
            scores.masked_fill_(plan.exclude_mask[j0:j1, i0:i1].t(), value)
        else:
            scores.masked_fill_(plan.exclude_mask[i0:i1, j0:j1], value)
    if plan.exclude_self:
        # the same entries in either orientation (the mirrored tiles of the symmetric path
        # only ever have self_offset 0)
        scores.diagonal(i0 + plan.self_offset - j0).fill_(value)


def _subtract_positives_(grad: Tensor, plan: TilePlan, weight: Tensor, i0: int, i1: int,
                         j0: int, j1: int, *, transposed: bool = False) -> None:
    """grad (tile of G) -= weight_i [j in P(i)], weight = g_i / |P(i)| (g_i for an index).
    transposed as in `_exclude_` (then weight belongs to the anchors j0:j1)."""
    if plan.positive_index is not None:
        # the positive of each anchor, if it falls in this tile: one scatter, no host sync
        if transposed:
            local = plan.positive_index[j0:j1] - i0
            inside = (local >= 0) & (local < i1 - i0)
            grad.scatter_add_(0, local.clamp(0, i1 - i0 - 1)[None, :],
                              -(weight[j0:j1] * inside)[None, :])
        else:
            local = plan.positive_index[i0:i1] - j0
            inside = (local >= 0) & (local < j1 - j0)
            grad.scatter_add_(1, local.clamp(0, j1 - j0 - 1)[:, None],
                              -(weight[i0:i1] * inside)[:, None])
        return
    if transposed:
        w = positive_tile(plan, j0, j1, i0, i1)
        if w is not None:
            grad.sub_(w.t() * weight[None, j0:j1])
    else:
        w = positive_tile(plan, i0, i1, j0, j1)
        if w is not None:
            grad.sub_(w * weight[i0:i1, None])


def _positive_weight(plan: TilePlan, g: Tensor) -> Tensor | None:
    if plan.positive_index is not None:
        return g
    if plan.has_tile_positives:
        return g / plan.positive_counts
    return None


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


class TiledInfoNCE(torch.autograd.Function):
    """Per-anchor ``lse_i - pos_i`` (see the module docstring), exact, tile by tile.

    Inputs: anchors (N, D), candidates (M, D), scale (0-d tensor, the inverse temperature,
    may require grad) and a `TilePlan`. Output: (N,). Every anchor must have at least one
    non-excluded candidate. Not twice differentiable.
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
        pos = _index_scores(scaled, candidates, plan)
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
        return _minus_positives(lse, pos, plan)

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
        pos_weight = _positive_weight(plan, g)
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
                if pos_weight is not None:
                    _subtract_positives_(p, plan, pos_weight, i0, i1, j0, j1)
                if grad_a is not None:
                    grad_a[i0:i1].addmm_(p, candidates[j0:j1])
                if grad_c is not None:
                    grad_c[j0:j1].addmm_(p.t(), anchors[i0:i1])
        return _finish_grads(grad_a, grad_c, anchors, scale, need_a, need_scale) + (None,)


def _index_scores(scaled: Tensor, candidates: Tensor, plan: TilePlan) -> Tensor | None:
    """The positive scores: directly for an index, zeros to accumulate tile-wise for a mask
    or labels, None without positives."""
    if plan.positive_index is not None:
        return (scaled * candidates[plan.positive_index]).sum(1)
    if plan.has_tile_positives:
        return scaled.new_zeros(scaled.shape[0])
    return None


def _minus_positives(lse: Tensor, pos: Tensor | None, plan: TilePlan) -> Tensor:
    if pos is None:
        return lse.clone()
    if plan.positive_index is not None:
        return lse - pos
    return lse - pos / plan.positive_counts


class SymmetricTiledInfoNCE(torch.autograd.Function):
    """`TiledInfoNCE` with anchors = candidates = z (N, D): the score matrix is symmetric,
    so each off-diagonal tile is computed once and used twice, by its rows (anchors of the
    row block) and by its columns (anchors of the column block). Same values and gradients,
    about half the matrix products. Needs square tiles (plan.rows == plan.cols); exclusion
    and positive masks need not be symmetric.
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
        pos = _index_scores(scaled, z, plan)
        for i0, i1 in _blocks(n, size):
            for j0, j1 in _blocks(n, size):
                if j0 < i0:
                    continue                    # its mirror covers it
                r, c = i1 - i0, j1 - j0
                s = torch.mm(scaled[i0:i1], z_t[:, j0:j1], out=buffer[: r * c].view(r, c))
                mirror = None
                if j0 != i0:                    # the same scores seen by anchors j0:j1
                    mirror = buffer[r * c: 2 * r * c].view(r, c).copy_(s)
                if plan.has_tile_positives:
                    w = positive_tile(plan, i0, i1, j0, j1)
                    pos[i0:i1] += torch.where(w, s, 0.0).sum(1)
                    if mirror is not None:
                        w = positive_tile(plan, j0, j1, i0, i1).t()
                        pos[j0:j1] += torch.where(w, mirror, 0.0).sum(0)
                _exclude_(s, plan, i0, i1, j0, j1, float("-inf"))
                _accumulate_(s, 1, run_max[i0:i1], run_sum[i0:i1])
                if mirror is not None:
                    _exclude_(mirror, plan, i0, i1, j0, j1, float("-inf"), transposed=True)
                    _accumulate_(mirror, 0, run_max[j0:j1], run_sum[j0:j1])
        lse = _finish_lse(run_max, run_sum)
        ctx.plan = plan
        ctx.save_for_backward(z, scale, lse)
        return _minus_positives(lse, pos, plan)

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
        pos_weight = _positive_weight(plan, g)
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
                    _subtract_positives_(p, plan, pos_weight, i0, i1, j0, j1)
                if q is None:       # diagonal block: z_I is on both sides of s
                    grad[i0:i1].addmm_(p, z[j0:j1]).addmm_(p.t(), z[i0:i1])
                    continue
                q.exp_()
                _exclude_(q, plan, i0, i1, j0, j1, 0.0, transposed=True)
                q.mul_(g[None, j0:j1])
                if pos_weight is not None:
                    _subtract_positives_(q, plan, pos_weight, i0, i1, j0, j1, transposed=True)
                p.add_(q)           # H = G_IJ + G_JI^T
                grad[i0:i1].addmm_(p, z[j0:j1])
                grad[j0:j1].addmm_(p.t(), z[i0:i1])
        grad_z, _, grad_scale = _finish_grads(grad, None, z, scale, need_z, need_scale,
                                              symmetric=True)
        return grad_z, grad_scale, None


class TiledLogSumExpBothWays(torch.autograd.Function):
    """CLIP's two directions over one score matrix ``s = scale * a c^T``, from one pass over
    its tiles: per row ``log sum_j exp(s_ij)`` and per column ``log sum_i exp(s_ij)``, minus
    the matched score ``s_ii`` of that row / column when ``matched`` (then N = M). Each tile
    serves both directions: three matrix products per tile for forward and backward instead
    of eight for two `TiledInfoNCE` calls. No exclusions.
    """

    @staticmethod
    def forward(ctx, a: Tensor, c: Tensor, scale: Tensor, size: int, matched: bool):
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
        ctx.size, ctx.matched = size, matched
        ctx.save_for_backward(a, c, scale, lse_rows, lse_cols)
        if matched:
            diagonal = (scaled * c).sum(1)
            return lse_rows - diagonal, lse_cols - diagonal
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
        g_matched = g_rows + g_cols if ctx.matched else None
        grad_a = torch.zeros_like(a) if (need_a or need_scale) else None
        grad_c = torch.zeros_like(c) if need_c else None
        buffer = a.new_empty(2 * rows * cols)
        neg_rows, neg_cols = -lse_rows, -lse_cols
        for i0, i1 in _blocks(n, rows):
            for j0, j1 in _blocks(m, cols):
                r, k = i1 - i0, j1 - j0
                # dL/ds_ij = g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j) - [i = j] (g_i + g_j)
                p = torch.mm(scaled[i0:i1], c_t[:, j0:j1], out=buffer[: r * k].view(r, k))
                q = torch.add(p, neg_cols[None, j0:j1], out=buffer[r * k: 2 * r * k].view(r, k))
                p.add_(neg_rows[i0:i1, None]).exp_().mul_(g_rows[i0:i1, None])
                p.add_(q.exp_().mul_(g_cols[None, j0:j1]))
                if g_matched is not None:
                    lo, hi = max(i0, j0), min(i1, j1)
                    if lo < hi:
                        p.diagonal(i0 - j0).sub_(g_matched[lo:hi])
                if grad_a is not None:
                    grad_a[i0:i1].addmm_(p, c[j0:j1])
                if grad_c is not None:
                    grad_c[j0:j1].addmm_(p.t(), a[i0:i1])
        return _finish_grads(grad_a, grad_c, a, scale, need_a, need_scale) + (None, None)


def tiled_logsumexp_both_ways(a: Tensor, c: Tensor, scale: Tensor, size: int, *,
                              matched: bool = False) -> tuple[Tensor, Tensor]:
    """(N,) and (M,): log sum_j exp(scale a_i . c_j) and log sum_i exp(scale a_i . c_j)
    (minus the matched score scale a_i . c_i with ``matched``), exact, memory-linear, one pass
    over size x size tiles for both."""
    if matched and a.shape[0] != c.shape[0]:
        raise ValueError(f"c: expected {a.shape[0]} rows like a (matched pairs), got "
                         f"{c.shape[0]}")
    return TiledLogSumExpBothWays.apply(a, c, scale, size, matched)


def tiled_info_nce(anchors: Tensor, candidates: Tensor, scale: Tensor, plan: TilePlan
                   ) -> Tensor:
    """Per-anchor ``lse_i - pos_i`` (N,), exact, memory-linear; see `TiledInfoNCE`. One
    tensor on both sides (nt_xent, supcon) takes `SymmetricTiledInfoNCE`."""
    if anchors is candidates and plan.rows == plan.cols and plan.self_offset == 0:
        return SymmetricTiledInfoNCE.apply(anchors, scale, plan)
    return TiledInfoNCE.apply(anchors, candidates, scale, plan)
