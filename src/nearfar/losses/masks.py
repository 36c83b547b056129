"""Boolean masks over (anchor, candidate) pairs, built from ids or labels."""

from __future__ import annotations

from torch import Tensor

from .checks import check_labels, check_tensor

__all__ = ["same_value_mask"]


def same_value_mask(a_ids: Tensor, b_ids: Tensor) -> Tensor:
    """Where two id vectors agree: ``mask[i, j] = a_ids[i] == b_ids[j]``.

    Use it as an exclusion mask for known false negatives: two crops of one image
    (same image id), near-duplicates (same duplicate-cluster id), or same-class items
    (same label). For the SimSiam / SimCLR layout of 2N views pass the ids twice:
    ``same_value_mask(ids.repeat(2), ids.repeat(2))``.

    Args:
        a_ids: (N,) integer ids of the anchors.
        b_ids: (M,) integer ids of the candidates, on the same device.

    Returns:
        (N, M) boolean mask.
    """
    for ids, name in ((a_ids, "a_ids"), (b_ids, "b_ids")):
        if check_tensor(ids, name).ndim != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of ids, got shape {tuple(ids.shape)}")
    a_ids = check_labels(a_ids, "a_ids", a_ids.shape[0], a_ids.device)
    b_ids = check_labels(b_ids, "b_ids", b_ids.shape[0], a_ids.device)
    return a_ids[:, None] == b_ids[None, :]
