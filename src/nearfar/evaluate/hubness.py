"""Hubness of an embedding space: how unevenly items appear in each other's k-NN lists.

In high dimensions a few points (hubs) turn up in the k-nearest-neighbour lists of
very many others while many points (antihubs) are in nobody's list (Radovanovic,
Nanopoulos and Ivanovic, 2010, "Hubs in Space", JMLR 11). The k-occurrence N_k(x) of an
item x is the number of other items that have x among their k nearest neighbours; its
mean is always k, and the skewness of its distribution measures hubness (0 for a
symmetric distribution; large and positive when hubs form). Retrieval and kNN
classification over a hubby space return the same few items for everything.

    counts = k_occurrence(emb, k=10)            # (N,) int64
    h = hubness(emb, k=10)                      # {"metric": "k_occurrence_skewness", ...}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nearfar.evaluate.inputs import as_embeddings, check_int, check_positive

#: elements of one (chunk x N) similarity block (64 MiB of float32)
_CHUNK_ELEMENTS = 16 * 2**20


def nearest_neighbours(emb, *, k: int = 10, exclude: Tensor | None = None,
                       chunk_size: int | None = None) -> Tensor:
    """Indices of each item's k most cosine-similar other items: (N, k) int64.

    Args:
        emb: (N, D) embeddings (tensor, numpy array or sequence); N >= k + 1.
        k: neighbours per item.
        exclude: optional (N,) integer ids (e.g. subjects): items sharing an item's id
            are never its neighbours (the item itself never is, either way).
        chunk_size: rows per similarity block; None picks about 64 MiB.

    Returns:
        (N, k) neighbour indices, most similar first. Ties break by lower index.
    """
    x = F.normalize(as_embeddings(emb, "emb"), dim=1)
    n = x.shape[0]
    k = check_int(k, "k", low=1)
    if k > n - 1:
        raise ValueError(f"k: expected at most N - 1 = {n - 1} (the other items), got {k}")
    if exclude is not None:
        exclude = torch.as_tensor(exclude).reshape(-1)
        if exclude.shape[0] != n:
            raise ValueError(f"exclude: expected {n} ids (one per embedding row), got "
                             f"{exclude.shape[0]}")
        largest = int(torch.unique(exclude, return_counts=True)[1].max())
        if n - largest < k:
            raise ValueError(f"k: expected at most {n - largest} (items outside the largest "
                             f"excluded id), got {k}")
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // n)
    out = torch.empty(n, k, dtype=torch.int64)
    with torch.no_grad():
        for a in range(0, n, chunk_size):
            sim = x[a:a + chunk_size] @ x.T                       # (b, N) cosine
            rows = torch.arange(a, min(a + chunk_size, n))
            sim[torch.arange(len(rows)), rows] = -float("inf")    # never oneself
            if exclude is not None:
                sim[exclude[rows][:, None] == exclude[None, :]] = -float("inf")
            out[a:a + len(rows)] = sim.topk(k, dim=1).indices
    return out


def k_occurrence(emb, *, k: int = 10, exclude: Tensor | None = None) -> Tensor:
    """N_k of every item: how many other items have it among their k nearest neighbours.

    Args:
        emb: (N, D) embeddings; cosine similarity.
        k: the neighbourhood size.
        exclude: optional (N,) ids; items sharing an id are not each other's neighbours.

    Returns:
        (N,) int64 counts; they sum to N * k.
    """
    nn_idx = nearest_neighbours(emb, k=k, exclude=exclude)
    return torch.bincount(nn_idx.reshape(-1), minlength=nn_idx.shape[0])


def skewness(values: Tensor) -> float:
    """Population skewness E[(x - mean)^3] / std^3 (0.0 when every value is equal)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        raise ValueError("values: expected at least one value, got none")
    centred = v - v.mean()
    std = centred.pow(2).mean().sqrt()
    if float(std) == 0.0:
        return 0.0
    return float(centred.pow(3).mean() / std**3)


def hubness_of_counts(counts: Tensor, k: int, *, hub_factor: float = 2.0) -> dict[str, float]:
    """Skewness, antihub share and hub share of k-occurrence counts (any subset of items).

    Hubs are items with N_k > hub_factor * k (Radovanovic et al., 2010 use 2k);
    antihubs are items with N_k = 0 (in nobody's k-NN list).
    """
    c = torch.as_tensor(counts).reshape(-1)
    n = max(int(c.numel()), 1)
    return {
        "skewness": skewness(c),
        "antihub_share": float((c == 0).sum()) / n,
        "hub_share": float((c > hub_factor * k).sum()) / n,
        "mean_k_occurrence": float(c.double().mean()) if c.numel() else 0.0,
        "max_k_occurrence": int(c.max()) if c.numel() else 0,
        "n_items": int(c.numel()),
    }


def hubness(emb, *, k: int = 10, hub_factor: float = 2.0, exclude: Tensor | None = None,
            counts: Tensor | None = None) -> dict[str, Any]:
    """Hubness of an embedding space (Radovanovic et al., 2010).

    Args:
        emb: (N, D) embeddings; cosine similarity, each item excluded from its own list.
        k: neighbourhood size (10 is the usual choice).
        hub_factor: an item is a hub when N_k > hub_factor * k.
        exclude: optional (N,) ids whose items are not each other's neighbours.
        counts: precomputed :func:`k_occurrence` counts for the same ``emb`` and ``k``.

    Returns:
        ``{"metric": "k_occurrence_skewness", "value": S_Nk, "skewness": S_Nk,
        "antihub_share": ..., "hub_share": ..., "mean_k_occurrence": k, "max_k_occurrence":
        ..., "n_items": N, "protocol": {...}}``.
    """
    k = check_int(k, "k", low=1)
    hub_factor = check_positive(hub_factor, "hub_factor")
    n = as_embeddings(emb, "emb").shape[0]
    if counts is None:
        counts = k_occurrence(emb, k=k, exclude=exclude)
    elif torch.as_tensor(counts).numel() != n:
        raise ValueError(f"counts: expected {n} k-occurrence counts like emb, got "
                         f"{torch.as_tensor(counts).numel()}")
    stats = hubness_of_counts(counts, k, hub_factor=hub_factor)
    protocol = {
        "name": "hubness",
        "reference": "Radovanovic et al., 2010",
        "k": k,
        "similarity": "cosine",
        "self_excluded": True,
        "excluded_same_id": exclude is not None,
        "skewness": "population skewness of the k-occurrence counts N_k",
        "hub": f"N_k > {hub_factor:g} * k",
        "antihub": "N_k = 0",
        "n_items": n,
    }
    return {"metric": "k_occurrence_skewness", "value": stats["skewness"], **stats,
            "protocol": protocol}


__all__ = ["hubness", "hubness_of_counts", "k_occurrence", "nearest_neighbours", "skewness"]
