"""Collectives for many processes (``torchrun``), autograd-aware where a loss needs it.

Layer 0: imports torch only. Every function returns its input unchanged (and
``rank_offset`` returns 0) when ``torch.distributed`` is not initialised or the world
size is 1, so a loss written against these helpers is the same code on one process.

The rule that makes DDP exact
-----------------------------
DDP averages parameter gradients over ranks: ``grad = (1/W) * sum_r dL_r/dθ``, where
``L_r`` is the loss rank ``r`` computed. A tensor ``z_s`` produced on rank ``s`` reaches
every rank's loss through a collective, but rank ``s`` only back-propagates its own
graph. So every collective here makes its backward **all-reduce (SUM)** the incoming
gradient: rank ``s`` then receives ``sum_r dL_r/dz_s`` and the DDP-averaged gradient is
exactly the gradient of ``(1/W) * sum_r L_r``. A loss is therefore DDP-exact when the
mean over ranks of what each rank returns equals the one-process loss on the
concatenated batch, either because

* every rank computes the same global loss (``L_r = L``), or
* each rank computes the mean over its own equal-sized share of the anchors
  (``local_loss=True``: the mean of the per-rank means is the global mean).

Peer-library bugs these avoid (the tests in ``tests/test_distributed.py`` reproduce
each one and check that it is caught):

* a gather whose backward returns only this rank's slice of the incoming gradient
  without summing it across ranks: the gradient from other ranks' anchors to this
  rank's candidates is lost (``all_gather_with_grad`` sums);
* ``dist.all_reduce`` on a statistic (a cross-correlation, a covariance) outside
  autograd: the other ranks' dependence on this rank's samples is lost and, after
  DDP's averaging, gradients come out about ``W`` times too small
  (``all_reduce_with_grad`` all-reduces in backward too);
* positives offset by ``rank * n`` when nothing was gathered (gather switched off,
  or a world of one): targets point at rows that are not there or are the wrong
  ones. ``rank_offset`` is 0 outside a world of several processes, and the losses
  only offset a row index when they gathered (see ``gathered_offset``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "rank_offset",
    "gathered_offset",
    "resolve_gather",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_with_grad",
    "all_reduce_no_grad",
]

_MAX_DIMS = 14


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 when ``torch.distributed`` is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank (0 when ``torch.distributed`` is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def rank_offset(n_local: int) -> int:
    """Row of this rank's first sample in a batch gathered by ``all_gather_*``.

    Every rank contributes ``n_local`` rows in rank order, so this is
    ``rank * n_local``; 0 when not distributed. Only offset a row index by this when
    the candidates really were gathered (the third bug in the module docstring).
    """
    return rank() * int(n_local) if is_distributed() else 0


def gathered_offset(n_local: int, gathered: bool) -> int:
    """``rank_offset(n_local)`` when the candidates were gathered, else 0: a local
    positive's row in the candidate matrix the loss actually built."""
    return rank_offset(n_local) if gathered else 0


def resolve_gather(gather: bool | None) -> bool:
    """``None`` means "gather when distributed with world size > 1"; a bool is kept,
    except that gathering is a no-op (False) in a world of one."""
    if gather is not None and not isinstance(gather, bool):
        raise ValueError(f"gather: expected None (automatic), True or False, got {gather!r}")
    if gather is None:
        return is_distributed()
    return bool(gather) and is_distributed()


def _shape_record(x: torch.Tensor) -> torch.Tensor:
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather: at most {_MAX_DIMS} dimensions, got {x.dim()}")
    rec = [x.dim(), *x.shape] + [0] * (_MAX_DIMS - x.dim())
    rec.append(_dtype_code(x.dtype))
    return torch.tensor(rec, dtype=torch.int64, device=x.device)


def _dtype_code(dtype: torch.dtype) -> int:
    # stable across processes (str hash is salted per process)
    return sum((i + 1) * ord(c) for i, c in enumerate(str(dtype)))


def _check_same_shape(x: torch.Tensor, what: str) -> None:
    """All ranks gather every rank's shape and dtype; all raise the same error if they
    differ (no rank is left waiting in a later collective)."""
    rec = _shape_record(x)
    recs = [torch.empty_like(rec) for _ in range(dist.get_world_size())]
    dist.all_gather(recs, rec)
    if any(not torch.equal(r, recs[0]) for r in recs[1:]):
        shapes = []
        for r in recs:
            nd = int(r[0])
            shapes.append(tuple(int(v) for v in r[1 : 1 + nd]))
        dtypes_differ = len({int(r[-1]) for r in recs}) > 1
        raise ValueError(
            f"{what}: every rank must pass a tensor of the same shape and dtype; "
            f"shapes by rank: {shapes}"
            + ("; dtypes differ across ranks" if dtypes_differ else "")
            + " (drop the last incomplete batch, e.g. drop_last=True, so batches are equal)"
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (n, ...) tensor; backward sums the incoming gradient
    over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        w = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(w)]
        dist.all_gather(parts, x)
        ctx.n = x.shape[0]
        ctx.rank = dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Rank s's rows feed every rank's loss: their gradient is the SUM over ranks.
        # Returning grad[own rows] without this all_reduce is the first peer bug.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.n
        return grad[start : start + ctx.n]


class _AllReduceWithGrad(torch.autograd.Function):
    """All-reduce (sum or mean) whose backward all-reduces the gradient the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mean: bool) -> torch.Tensor:  # type: ignore[override]
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        ctx.scale = 1.0 / dist.get_world_size() if mean else 1.0
        if mean:
            y = y * ctx.scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # y = (sum_r x_r) * scale on every rank; d(sum_r L_r)/dx_s = scale * sum_r dL_r/dy.
        # A plain dist.all_reduce in forward (no autograd) drops the sum: the second bug.
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        if ctx.scale != 1.0:
            g = g * ctx.scale
        return g, None


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized ``(n, ...)`` tensors from every rank, in rank order,
    with gradients: backward all-reduces (SUM) the incoming gradient and returns this
    rank's ``n`` rows, so rows used as candidates by other ranks receive the
    gradient of those ranks' losses too (the peer bug it avoids: a backward that
    returned only the local slice, unsummed). Raises ``ValueError`` on every rank if
    the ranks' shapes or dtypes differ. Returns ``x`` unchanged when not distributed.
    """
    if not is_distributed():
        return x
    _check_same_shape(x, "all_gather_with_grad")
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized ``(n, ...)`` tensors from every rank, in rank order,
    outside autograd (labels, momentum keys, queue entries). Raises ``ValueError`` if
    shapes or dtypes differ. Returns ``x`` unchanged when not distributed."""
    if not is_distributed():
        return x
    _check_same_shape(x, "all_gather_no_grad")
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def all_reduce_with_grad(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (``op="sum"``) or mean (``op="mean"``) of ``x`` over ranks, autograd-aware:
    the backward all-reduces the gradient too, so a statistic over the global batch
    (Barlow Twins' cross-correlation, VICReg's covariance) passes every rank's
    dependence back to the rank that owns each sample. The peer bug it avoids: a plain
    ``dist.all_reduce`` with no autograd, which after DDP's averaging left gradients
    about W times too small. Returns ``x`` unchanged when not distributed."""
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce_with_grad: op must be 'sum' or 'mean', got {op!r}")
    if not is_distributed():
        return x
    return _AllReduceWithGrad.apply(x, op == "mean")


def all_reduce_no_grad(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or mean of a detached ``x`` over ranks (statistics with no gradient, such as
    DINO's teacher centre). Returns a new tensor; ``x`` itself when not distributed."""
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce_no_grad: op must be 'sum' or 'mean', got {op!r}")
    if not is_distributed():
        return x
    y = x.detach().contiguous().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    if op == "mean":
        y = y / dist.get_world_size()
    return y
