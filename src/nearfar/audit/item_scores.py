"""Per-item scores that average to a metric, so a metric can be split by group and its
interval drawn by resampling items or subjects.

``knn_correct``: the weighted kNN vote of Wu et al. (2018) (cosine similarity, weight
exp(s / temperature)) names the item's label; its mean is kNN top-1 accuracy.
``neighbour_precision``: the share of the item's k nearest neighbours with its label;
its mean is precision@k of label retrieval.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nearfar.audit.groups import AuditError
from nearfar.evaluate.inputs import as_embeddings, as_labels, check_int, check_positive

#: elements of one (chunk x N) similarity block (64 MiB of float32)
_CHUNK_ELEMENTS = 16 * 2**20


def knn_item_scores(query, query_labels, reference=None, reference_labels=None, *,
                    k: int = 10, temperature: float = 0.07, query_ids=None,
                    reference_ids=None) -> dict[str, np.ndarray]:
    """kNN correctness and neighbour label precision of every query item.

    Args:
        query: (N, D) embeddings to score.
        query_labels: (N,) integer labels.
        reference: (M, D) labelled embeddings to search; None searches ``query`` itself
            (leave-one-out: an item is never its own neighbour).
        reference_labels: (M,) labels of ``reference``.
        k: neighbours that vote.
        temperature: > 0, the vote weight exp(cosine / temperature).
        query_ids, reference_ids: optional (N,) / (M,) integer ids (subjects; the source
            item of a corrupted copy): a reference item sharing the query's id is never
            its neighbour, so a subject's other images cannot vote for it.

    Returns:
        ``{"knn_correct": (N,) float 0/1, "neighbour_precision": (N,) float in [0, 1]}``.
    """
    q = F.normalize(as_embeddings(query, "query"), dim=1)
    yq = as_labels(query_labels, "query_labels", q.shape[0])
    loo = reference is None
    if loo:
        r, yr = q, yq
        if query_ids is None:
            query_ids = np.arange(q.shape[0])
        reference_ids = query_ids
    else:
        r = F.normalize(as_embeddings(reference, "reference", dim=q.shape[1]), dim=1)
        yr = as_labels(reference_labels, "reference_labels", r.shape[0])
    k = check_int(k, "k", low=1)
    temperature = check_positive(temperature, "temperature")
    qid = None if query_ids is None else torch.as_tensor(np.asarray(query_ids)).reshape(-1)
    rid = None if reference_ids is None else torch.as_tensor(np.asarray(reference_ids)).reshape(-1)
    if (qid is None) != (rid is None):
        raise AuditError("query_ids / reference_ids: give both or neither")
    if qid is not None and (len(qid) != q.shape[0] or len(rid) != r.shape[0]):
        raise AuditError(f"query_ids / reference_ids: expected {q.shape[0]} and {r.shape[0]} "
                         f"ids, got {len(qid)} and {len(rid)}")
    if k > r.shape[0] - (1 if loo else 0):
        raise AuditError(f"k: expected at most {r.shape[0] - int(loo)} reference items, got {k}")
    classes, y_index = torch.unique(torch.cat([yr, yq]), sorted=True, return_inverse=True)
    yr_i, yq_i = y_index[:len(yr)], y_index[len(yr):]
    chunk = max(1, _CHUNK_ELEMENTS // r.shape[0])
    correct = np.empty(q.shape[0])
    precision = np.empty(q.shape[0])
    with torch.no_grad():
        for a in range(0, q.shape[0], chunk):
            b = min(a + chunk, q.shape[0])
            sim = q[a:b] @ r.T
            if qid is not None:
                sim[qid[a:b, None] == rid[None, :]] = -float("inf")
            top, idx = sim.topk(k, dim=1)
            if not bool(torch.isfinite(top).all()):
                raise AuditError(f"k: {k} neighbours outside each item's own id (subject) are "
                                 f"not available for every item; lower k")
            w = torch.exp((top - top[:, :1]) / temperature)
            votes = torch.zeros(b - a, len(classes), dtype=w.dtype)
            votes.scatter_add_(1, yr_i[idx], w)
            correct[a:b] = (votes.argmax(1) == yq_i[a:b]).double().numpy()
            precision[a:b] = (yr_i[idx] == yq_i[a:b, None]).double().mean(1).numpy()
    return {"knn_correct": correct, "neighbour_precision": precision}


__all__ = ["knn_item_scores"]
