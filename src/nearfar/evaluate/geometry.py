"""Geometry of a frozen embedding space: alignment and uniformity (Wang & Isola, 2020).

Alignment is the mean squared distance between the L2-normalised embeddings of two
views of the same item (lower: positives land together); uniformity is the log of the
mean Gaussian potential exp(-t ||x - y||^2) over pairs of items (lower: the embeddings
spread over the sphere; 0 is total collapse). The numerics are those of the losses in
``nearfar.losses.geometry``; this module states the protocol: which pairs, how many
items, which views.

    g = geometry_metrics(z1, z2, views="the recipe's training views, seed 0")
    # {"alignment": Result, "uniformity": Result}
"""

from __future__ import annotations

from typing import Any

import torch

from nearfar.evaluate.inputs import as_embeddings, check_int, check_positive
from nearfar.evaluate.result import Result


def geometry_metrics(z1, z2, *, alpha: float = 2, t: float = 2,
                     max_uniformity_items: int = 2000, seed: int = 0,
                     views: Any = None) -> dict[str, Result]:
    """Alignment of positive pairs and uniformity of each view (Wang & Isola, 2020).

    Args:
        z1, z2: (N, D) embeddings of two views of the same N items; row i of each is a
            positive pair. Normalised inside.
        alpha: alignment exponent (paper: 2).
        t: uniformity temperature (paper: 2).
        max_uniformity_items: uniformity costs N^2 / 2 pair distances; above this many
            items a fixed random subset (drawn from ``seed``) is used and recorded.
        seed: for that subset.
        views: plain-data description of how the two views were made (for the protocol).

    Returns:
        ``{"alignment": Result, "uniformity": Result}``; uniformity is the mean over the
        two views, as in the paper's loss.
    """
    # the numerics live with the losses; imported here so that importing nearfar.evaluate
    # does not pull in the loss library (evaluate imports torch only)
    from nearfar.losses.geometry import alignment, uniformity

    a = as_embeddings(z1, "z1")
    b = as_embeddings(z2, "z2")
    if a.shape != b.shape:
        raise ValueError(f"z2: expected shape {tuple(a.shape)} like z1, got {tuple(b.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"z1: expected at least 2 rows for uniformity, got {a.shape[0]}")
    alpha = check_positive(alpha, "alpha")
    t = check_positive(t, "t")
    cap = check_int(max_uniformity_items, "max_uniformity_items", low=2)
    n = a.shape[0]
    idx = None
    if n > cap:
        g = torch.Generator().manual_seed(check_int(seed, "seed", low=0))
        idx = torch.randperm(n, generator=g)[:cap]
    protocol = {"name": "geometry", "reference": "Wang & Isola, 2020",
                "pairs": "two views of each held-out item", "n_train": 0, "n_test": n,
                "normalised": "L2, inside", "views": views}
    with torch.no_grad():
        align = float(alignment(a.double(), b.double(), alpha=alpha))
        ua, ub = (x.double() if idx is None else x[idx].double() for x in (a, b))
        unif = 0.5 * (float(uniformity(ua, t=t)) + float(uniformity(ub, t=t)))
    return {
        "alignment": Result(align, "alignment", {
            **protocol, "alpha": alpha,
            "definition": "mean ||x_i - y_i||^alpha over positive pairs (lower is closer)"}),
        "uniformity": Result(unif, "uniformity", {
            **protocol, "t": t, "n_items_used": n if idx is None else cap,
            "subset": "all items" if idx is None else f"random {cap} of {n} (seed {seed})",
            "definition": "log mean_{i<j} exp(-t ||x_i - x_j||^2), mean of the two views "
                          "(lower is more uniform; 0 is collapse)"}),
    }


__all__ = ["geometry_metrics"]
