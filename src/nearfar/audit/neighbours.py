"""Nearest-neighbour behaviour by group: who is near whom, and who is a hub.

For each item, the groups of its k nearest neighbours (cosine; itself and, when given,
its own subject's other items excluded) are compared with the base rate: the share of
each group among the items it could have had as neighbours. A group whose items mostly
see their own group (enrichment > 1 on the diagonal) is clustered apart; a group that
rarely appears in anyone's neighbour lists is under-retrieved. Hubness per group uses
the k-occurrence of Radovanovic et al. (2010) (:mod:`nearfar.evaluate.hubness`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nearfar.audit.groups import AuditError, encode
from nearfar.evaluate.hubness import hubness_of_counts, nearest_neighbours, skewness
from nearfar.evaluate.inputs import as_embeddings, check_int


def neighbour_composition(emb, groups, *, k: int = 10, subjects=None,
                          hub_factor: float = 2.0) -> dict[str, Any]:
    """Group composition of each item's k-NN against base rates, and hubness per group.

    Args:
        emb: (N, D) embeddings.
        groups: (N,) group of each item.
        k: neighbours per item.
        subjects: optional (N,) subjects; a subject's own items are not its neighbours.
        hub_factor: a hub has N_k > hub_factor * k.

    Returns:
        ``{"groups", "share": {g: {h: observed share of h among g's neighbours}},
        "base_rate": {g: {h: ...}}, "enrichment": {g: {h: share / base}},
        "own_group": {g: {"share", "base_rate", "enrichment"}}, "hubness": {"overall":
        {...}, "groups": {g: {...}}}, "protocol"}``.
    """
    x = as_embeddings(emb, "emb")
    n = x.shape[0]
    k = check_int(k, "k", low=1)
    g_codes, g_names = encode(groups, "groups", n)
    subj = np.arange(n) if subjects is None else encode(subjects, "subjects", n)[0]
    try:
        nn_idx = nearest_neighbours(x, k=k, exclude=torch.as_tensor(subj)).numpy()
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    n_groups = len(g_names)
    # observed: per item, the share of its k neighbours in each group
    neighbour_groups = g_codes[nn_idx]                                   # (N, k)
    observed = np.zeros((n, n_groups))
    for h in range(n_groups):
        observed[:, h] = (neighbour_groups == h).mean(1)
    # base rate: per item, the share of each group among the items it could have drawn
    group_sizes = np.bincount(g_codes, minlength=n_groups).astype(np.float64)
    _, subj_index = np.unique(subj, return_inverse=True)
    own = np.zeros((subj_index.max() + 1, n_groups))
    np.add.at(own, (subj_index, g_codes), 1.0)                           # subject x group
    available = group_sizes[None, :] - own[subj_index]                   # (N, G)
    base = available / available.sum(1, keepdims=True)
    share, base_rate, enrichment = {}, {}, {}
    for g, name in enumerate(g_names):
        rows = g_codes == g
        o, b = observed[rows].mean(0), base[rows].mean(0)
        share[name] = {h: float(o[j]) for j, h in enumerate(g_names)}
        base_rate[name] = {h: float(b[j]) for j, h in enumerate(g_names)}
        enrichment[name] = {h: float(o[j] / b[j]) if b[j] > 0 else None
                            for j, h in enumerate(g_names)}
    own_group = {name: {"share": share[name][name], "base_rate": base_rate[name][name],
                        "enrichment": enrichment[name][name]} for name in g_names}
    counts = torch.as_tensor(np.bincount(nn_idx.reshape(-1), minlength=n))
    per_group = {}
    for g, name in enumerate(g_names):
        c = counts[torch.as_tensor(g_codes == g)]
        stats = hubness_of_counts(c, k, hub_factor=hub_factor)
        stats["relative_k_occurrence"] = stats["mean_k_occurrence"] / k
        per_group[name] = stats
    overall = hubness_of_counts(counts, k, hub_factor=hub_factor)
    overall["skewness"] = skewness(counts)
    protocol = {
        "name": "nearest-neighbour composition and hubness",
        "k": k,
        "similarity": "cosine",
        "excluded": "the item itself" + (" and its subject's other items"
                                         if subjects is not None else ""),
        "share": "mean over a group's items of the fraction of their k neighbours in each "
                 "group",
        "base_rate": "mean over a group's items of each group's fraction of the items "
                     "they could have drawn",
        "enrichment": "share / base_rate (1 = as by chance)",
        "hubness": f"k-occurrence N_k (Radovanovic et al., 2010); hub: N_k > {hub_factor:g}k;"
                   " antihub: N_k = 0; relative_k_occurrence: mean N_k / k of the group's "
                   "items (1 = retrieved as often as average)",
        "n_items": n,
    }
    return {"groups": g_names, "share": share, "base_rate": base_rate,
            "enrichment": enrichment, "own_group": own_group,
            "hubness": {"overall": overall, "groups": per_group}, "protocol": protocol}


__all__ = ["neighbour_composition"]
