"""What the losses share for many processes: checking the ``gather`` / ``local_loss``
keywords and calling the collectives of `nearfar.distributed`.

The collectives are looked up on the module at call time (``distributed.all_gather_with_grad``,
not a copy imported by name), so one autograd-aware all-gather serves every loss, and
the tests can swap in the peer libraries' broken versions to show they would be caught.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nearfar import distributed


def check_gather(gather: object, local_loss: object) -> tuple[bool, bool]:
    """(gather, local_loss) as given, validated; gather is False in a world of one (or
    without a process group), where every loss is its one-process self."""
    for value, name in ((gather, "gather"), (local_loss, "local_loss")):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected True or False, got {value!r}")
    gathering = gather and distributed.is_distributed()
    return gathering, bool(local_loss) and gathering


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of ``x`` in rank order, with gradients (backward sums over
    ranks)."""
    return distributed.all_gather_with_grad(x)


def all_gather_rows_no_grad(x: Tensor) -> Tensor:
    """Every rank's rows of ``x`` in rank order, outside autograd (labels, keys)."""
    return distributed.all_gather_no_grad(x)


def gathered_offset(n_local: int, gathered: bool) -> int:
    """Row of this rank's first sample among gathered rows; 0 when nothing was gathered."""
    return distributed.gathered_offset(n_local, gathered)


def reduce_sums(tensors: list[Tensor], gathered: bool) -> list[Tensor]:
    """Each tensor summed over ranks, in one autograd-aware all-reduce (its backward
    all-reduces the gradient too); the tensors themselves when not gathering."""
    if not gathered:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    total = distributed.all_reduce_with_grad(flat, op="sum")
    out, start = [], 0
    for t in tensors:
        out.append(total[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def world_size(gathered: bool) -> int:
    return distributed.world_size() if gathered else 1
