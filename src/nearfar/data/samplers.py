"""Known false negatives: batches that keep a group's items apart, and masks that drop the
pairs a batch cannot avoid.

In-batch negatives are only as good as the batch: two crops of one photo, two
near-duplicates or two recordings of one speaker in a batch are "negatives" that are
really positives (Chuang et al., 2020; Huynh et al., 2022). Two tools:

* :class:`DistinctGroupBatches`, a batch order for the Trainer
  (``Trainer(..., batch_order=DistinctGroupBatches(groups))``): each epoch's random
  permutation is rearranged so that the items of one group land in different batches.
* :func:`same_group_mask` / :func:`two_view_exclusion`: boolean masks over (anchor,
  candidate) pairs from ids or labels, for the ``exclude=`` of
  :func:`nearfar.losses.info_nce`, :func:`~nearfar.losses.debiased_info_nce` and
  :func:`~nearfar.losses.hard_negative_info_nce`.

Groups can be duplicate-cluster ids, source ids (one recording, one patient), or labels
(then a batch is as class-balanced as its size allows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nearfar.losses.masks import same_value_mask

__all__ = ["DistinctGroupBatches", "max_group_size", "same_group_mask", "two_view_exclusion"]


def _as_ids(ids: Tensor | Sequence[Any] | np.ndarray, name: str) -> Tensor:
    """(N,) int64 ids from integers or from any hashable values (mapped to 0..K-1)."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        ids = torch.from_numpy(ids.astype(np.int64))
    if isinstance(ids, Tensor):
        if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"{name}: expected a 1-D integer tensor, got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        return ids.to(torch.int64)
    values = list(ids)
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                      for v in values):
        return torch.tensor(values, dtype=torch.int64)
    codes: dict[Any, int] = {}
    return torch.tensor([codes.setdefault(v, len(codes)) for v in values], dtype=torch.int64)


def max_group_size(groups: Tensor) -> int:
    """Items in the largest group (0 for no items)."""
    if groups.numel() == 0:
        return 0
    return int(torch.unique(groups, return_counts=True)[1].max())


class DistinctGroupBatches:
    """Rearranges each epoch's permutation so that no batch holds two items of one group.

    A batch order for :class:`nearfar.train.Trainer`: ``order(perm, batch_size)`` takes
    the epoch's random permutation of the N items and returns another permutation of
    them; the Trainer cuts it into consecutive batches of ``batch_size`` (the last
    ``N mod batch_size`` items wait for the next epoch, as without an order). A pure
    function of ``perm``: all the randomness is the Trainer's, so resuming a run is exact.

    How (vectorised: one ``unique``, one scatter, one stable sort, one reshape): the
    permutation is stably sorted so that each group's items are contiguous (groups in
    the random order of their first appearance, items in their random order), then
    dealt like cards into the ``nb = N // batch_size`` batches: position p of the sorted
    sequence goes to batch ``p mod nb``.

    Guarantee: a group with m items contributes at most ``ceil(m / nb)`` items to any
    batch, the fewest possible. In particular, when no group has more than
    ``N // batch_size`` items, no batch ever holds two items of one group; with
    labels as groups, every batch holds each class within one item of its share.

    Args:
        groups: (N,) group of every item, aligned with the dataset (integers, or any
            hashable values such as ``dataset.meta["group"]``).
        name: what the groups are, for ``describe()`` ("duplicate cluster", "label", ...).
    """

    def __init__(self, groups: Tensor | Sequence[Any] | np.ndarray, *, name: str = "group"
                 ) -> None:
        self.groups = _as_ids(groups, "groups")
        if self.groups.numel() == 0:
            raise ValueError("groups: expected one group per item, got none")
        self.name = str(name)
        self.largest = max_group_size(self.groups)

    def __call__(self, perm: Tensor, batch_size: int) -> Tensor:
        n = int(perm.shape[0])
        if n != self.groups.shape[0]:
            raise ValueError(f"perm: expected a permutation of the {self.groups.shape[0]} items "
                             f"that have a group, got {n} items")
        batches = n // batch_size
        if batches == 0:
            return perm
        perm = perm.to(torch.int64)
        g = self.groups.to(perm.device)[perm]
        _, group = torch.unique(g, return_inverse=True)
        position = torch.arange(n, device=perm.device)
        first = torch.full((int(group.max()) + 1,), n, dtype=torch.int64, device=perm.device)
        first = first.scatter_reduce(0, group, position, reduce="amin")
        sequence = perm[torch.sort(first[group], stable=True).indices]
        used = batches * batch_size
        dealt = sequence[:used].reshape(batch_size, batches).t().reshape(-1)
        return torch.cat([dealt, sequence[used:]])

    def per_batch_bound(self, n: int, batch_size: int) -> int:
        """Most items of one group that a batch can hold (1: no repeats)."""
        return math.ceil(self.largest / max(n // batch_size, 1))

    def describe(self) -> dict[str, Any]:
        return {
            "name": "distinct_group_batches",
            "groups": self.name,
            "n_groups": int(torch.unique(self.groups).numel()),
            "largest_group": self.largest,
            "guarantee": f"no batch holds two items of one {self.name} while the largest "
                         f"{self.name} has at most N // batch_size items; otherwise at most "
                         f"ceil(m / (N // batch_size)) of a {self.name} of m items",
        }

    def __repr__(self) -> str:
        return (f"DistinctGroupBatches(name={self.name!r}, items={self.groups.numel()}, "
                f"largest_group={self.largest})")


def same_group_mask(ids: Tensor, *, views: int = 1) -> Tensor:
    """(V N, V N) bool: True where two rows share an id, for V stacked views of N items.

    Args:
        ids: (N,) integer ids (item ids, duplicate-cluster ids, source ids or labels).
        views: V, copies stacked as [view 1; view 2; ...] (2 for the SimCLR layout).

    Returns:
        ``mask[i, j] = ids[i mod N] == ids[j mod N]``, except that a negative id means
        unknown (e.g. an unlabelled item) and matches only the item's own views; the
        diagonal and every item's own other views are always True.
    """
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views: expected an integer >= 1, got {views!r}")
    ids = _as_ids(ids, "ids")
    stacked = ids.repeat(views)
    known = stacked >= 0
    item = torch.arange(ids.shape[0], device=ids.device).repeat(views)
    return (same_value_mask(stacked, stacked) & known[:, None] & known[None, :]) \
        | same_value_mask(item, item)


def two_view_exclusion(ids: Tensor) -> Tensor:
    """(2N, 2N) bool exclusion mask of the known false negatives of the SimCLR layout.

    Rows and columns are [view 1; view 2] of N items; an entry is True (never scored)
    where the two views share an id, except the positive pair (view i with view i + N),
    which stays scorable; the diagonal (a view with itself) is True. Pass it as
    ``exclude=`` to :func:`nearfar.losses.info_nce` (with the partner index as positives),
    :func:`~nearfar.losses.debiased_info_nce` or :func:`~nearfar.losses.hard_negative_info_nce`.

    Args:
        ids: (N,) integer ids, e.g. labels or duplicate-cluster ids of the batch.
    """
    mask = same_group_mask(ids, views=2)
    n = mask.shape[0] // 2
    rows = torch.arange(2 * n, device=mask.device)
    mask[rows, (rows + n) % (2 * n)] = False
    return mask
