"""Scalars a method logs about its own positives and negatives.

``false_negative_rate``: of the negatives an anchor is contrasted with, the share that
carry the anchor's own label, i.e. would be positives if labels were known. It measures
how much a label-free objective pushes apart same-class items (Chuang et al., 2020;
Huynh et al., 2022). Only for logging: labels never enter the loss of an unsupervised
method. Returned as a 0-d tensor, so logging it does not synchronise a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNKNOWN = -1


def false_negative_rate(anchor_labels: Tensor | None, candidate_labels: Tensor | None, *,
                        negatives: Tensor | None = None) -> Tensor | None:
    """Share of (anchor, negative) pairs whose labels agree.

    Args:
        anchor_labels: (N,) integer labels of the anchors; -1 (or any negative value)
            means unknown. None: no labels, returns None.
        candidate_labels: (M,) labels of the candidates, -1 unknown. None: returns None.
        negatives: (N, M) bool, which pairs are negatives in the loss (False for the
            anchor itself, its positives, excluded pairs). None: every pair.

    Returns:
        0-d float32 tensor in [0, 1]: same-label negatives / negatives with both labels
        known (0 when there are none), or None without labels.
    """
    if anchor_labels is None or candidate_labels is None:
        return None
    a = anchor_labels.reshape(-1)
    c = candidate_labels.reshape(-1).to(a.device)
    known = (a[:, None] >= 0) & (c[None, :] >= 0)
    if negatives is not None:
        if negatives.shape != known.shape:
            raise ValueError(f"negatives: expected shape {tuple(known.shape)} (anchors x "
                             f"candidates), got {tuple(negatives.shape)}")
        known &= negatives.to(known.device)
    same = known & (a[:, None] == c[None, :])
    return (same.sum().float() / known.sum().clamp(min=1).float()).detach()


def in_batch_false_negative_rate(labels: Tensor | None, views: int = 2) -> Tensor | None:
    """False-negative rate of the SimCLR / NT-Xent layout: ``views`` stacked copies of N
    items; each view's negatives are every other view except its own item's.

    Args:
        labels: (N,) labels of the items (-1 unknown), or None.
        views: copies stacked as [view 1; view 2; ...].

    Returns:
        As :func:`false_negative_rate`; None without labels.
    """
    if labels is None:
        return None
    n = labels.shape[0]
    item = torch.arange(n, device=labels.device).repeat(views)
    negatives = item[:, None] != item[None, :]
    lab = labels.repeat(views)
    return false_negative_rate(lab, lab, negatives=negatives)


def cross_false_negative_rate(labels: Tensor | None) -> Tensor | None:
    """False-negative rate of a query-key layout (MoCo v3, CLIP): query i against the N
    keys, key i its positive, the other N - 1 its negatives."""
    if labels is None:
        return None
    n = labels.shape[0]
    negatives = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    return false_negative_rate(labels, labels, negatives=negatives)
