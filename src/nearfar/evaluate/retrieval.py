"""Cross-modal retrieval: recall@k and mean reciprocal rank, image -> text and text -> image.

Every query ranks all items by cosine similarity. A query may have several relevant
items (several captions of one image, many images of one described scene): relevance is
a boolean (queries x items) matrix or, more compactly, group ids (query i and item j are
relevant when their groups are equal); with neither, query i's one relevant item is
item i. Scores are computed in chunks of queries, so no full similarity matrix is held.

* recall@k: the fraction of queries with at least one relevant item among the k best
  ranked (the COCO / Flickr30k protocol of CLIP, Radford et al., 2021);
* MRR: the mean over queries of 1 / (rank of the first relevant item);
* nDCG@k (Jarvelin & Kekalainen, 2002): DCG@k = sum_{r <= k} gain(rel_r) / log2(r + 1)
  over the k best ranked items, divided by the DCG@k of the ideal order; relevance may be
  graded (a non-negative (queries x items) matrix) or binary, with any number of
  relevant items per query. The gain is 2^rel - 1 (Burges et al., 2005) or rel; both are
  1 / 0 for binary relevance.

Ties are broken against the query: an irrelevant item that scores exactly as high as the
best relevant one ranks before it, so a collapsed embedding does not look good.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nearfar.evaluate.inputs import _to_tensor, as_embeddings, check_int
from nearfar.evaluate.result import Result

#: elements of one (query chunk x items) block when chunk_size is None (64 MiB of float32)
_AUTO_CHUNK_ELEMENTS = 16 * 2**20


def _groups(x: object, name: str, n: int, codes: dict[Any, int]) -> Tensor:
    """Group ids as an int64 (n,) tensor; strings and other hashables are numbered through
    ``codes`` (shared by the query and item sides, so equal values get equal numbers)."""
    if isinstance(x, (list, tuple)) and any(not isinstance(v, (int, np.integer))
                                            or isinstance(v, bool) for v in x):
        x = [codes.setdefault(("value", v), len(codes)) for v in x]
    t = _to_tensor(x, name)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} group ids (one per row), got shape "
                         f"{tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer group ids, got dtype {t.dtype}")
    return t.to(torch.int64)


def _relevance_source(n_queries: int, n_items: int, relevance: object, query_groups: object,
                      item_groups: object, names: tuple[str, str, str]):
    """A function (start, stop) -> boolean (stop - start, n_items) relevance block."""
    rel_name, q_name, i_name = names
    if relevance is not None:
        if query_groups is not None or item_groups is not None:
            raise ValueError(f"{rel_name}: give either a relevance matrix or group ids, not both")
        rel = _to_tensor(relevance, rel_name)
        if rel.dtype != torch.bool or tuple(rel.shape) != (n_queries, n_items):
            raise ValueError(f"{rel_name}: expected a boolean ({n_queries}, {n_items}) matrix, "
                             f"got {rel.dtype} {tuple(rel.shape)}")
        return (lambda a, b: rel[a:b]), "relevance matrix"
    if (query_groups is None) != (item_groups is None):
        raise ValueError(f"{q_name}, {i_name}: expected both group id lists or neither")
    if query_groups is not None:
        mixed = [isinstance(g, (list, tuple)) and any(
            not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in g)
            for g in (query_groups, item_groups)]
        if mixed[0] != mixed[1]:
            raise ValueError(f"{q_name}, {i_name}: expected group ids of one kind on both "
                             f"sides (integers, or strings / other values), got a mix")
        codes: dict[Any, int] = {}
        qg = _groups(query_groups, q_name, n_queries, codes)
        ig = _groups(item_groups, i_name, n_items, codes)
        return (lambda a, b: qg[a:b, None] == ig[None, :]), "same group id"
    if n_queries != n_items:
        raise ValueError(f"{rel_name}: without relevance or groups, query i matches item i, "
                         f"which needs as many queries as items; got {n_queries} and {n_items}")
    eye = torch.arange(n_items)
    return (lambda a, b: torch.arange(a, b)[:, None] == eye[None, :]), "paired rows (i <-> i)"


def first_relevant_ranks(queries, items, *, relevance=None, query_groups=None,
                         item_groups=None, chunk_size: int | None = None,
                         device: torch.device | str | None = None) -> Tensor:
    """1-based rank of the first relevant item for every query (0 when it has none).

    Args:
        queries: (Q, D) embeddings; items: (M, D) embeddings (cosine similarity).
        relevance: optional boolean (Q, M) matrix.
        query_groups, item_groups: optional (Q,) and (M,) group ids (ints or strings).
        chunk_size: queries scored at once (None: automatic).
        device: where the scores are computed (None: CPU).

    Returns:
        int64 (Q,) ranks.
    """
    q = as_embeddings(queries, "queries")
    m = as_embeddings(items, "items", dim=q.shape[1])
    relevant, _ = _relevance_source(len(q), len(m), relevance, query_groups, item_groups,
                                    ("relevance", "query_groups", "item_groups"))
    return _ranks(q, m, relevant, chunk_size, device)


def _ranks(q: Tensor, m: Tensor, relevant, chunk_size: int | None, device) -> Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if chunk_size is None:
        chunk_size = max(1, _AUTO_CHUNK_ELEMENTS // len(m))
    else:
        chunk_size = check_int(chunk_size, "chunk_size", low=1)
    items = F.normalize(m.to(device), dim=1)
    out = torch.zeros(len(q), dtype=torch.int64)
    with torch.no_grad():
        for a in range(0, len(q), chunk_size):
            b = min(a + chunk_size, len(q))
            sim = F.normalize(q[a:b].to(device), dim=1) @ items.T           # (b - a, M)
            rel = relevant(a, b).to(device)
            best = sim.masked_fill(~rel, float("-inf")).amax(1)             # best relevant
            ahead = ((sim >= best[:, None]) & ~rel).sum(1)                  # ties: against
            out[a:b] = torch.where(rel.any(1), ahead + 1, 0).cpu()
    return out


def retrieval_metrics(queries, items, *, relevance=None, query_groups=None, item_groups=None,
                      ks: Sequence[int] = (1, 5, 10), direction: str = "query_to_item",
                      chunk_size: int | None = None, device: torch.device | str | None = None
                      ) -> dict[str, Result]:
    """Recall@k for each k and MRR of one retrieval direction.

    Queries without any relevant item are left out (their count is in the protocol); it
    is an error when no query has one.

    Returns:
        ``{"<direction>_recall@<k>": Result, ..., "<direction>_mrr": Result}``, each Result
        with its protocol (direction, k, counts, how relevance was defined, similarity).
    """
    q = as_embeddings(queries, "queries")
    m = as_embeddings(items, "items", dim=q.shape[1])
    if not isinstance(ks, (list, tuple)) or not ks:
        raise ValueError(f"ks: expected a non-empty list of integers >= 1, got {ks!r}")
    ks = [check_int(k, "ks", low=1) for k in ks]
    relevant, how = _relevance_source(len(q), len(m), relevance, query_groups, item_groups,
                                      ("relevance", "query_groups", "item_groups"))
    ranks = _ranks(q, m, relevant, chunk_size, device)
    counted = ranks > 0
    n = int(counted.sum())
    if n == 0:
        raise ValueError("relevance: no query has a relevant item; nothing to score")
    r = ranks[counted].double()
    n_relevant = []
    for a in range(0, len(q), 4096):
        n_relevant.append(relevant(a, min(a + 4096, len(q))).sum(1))
    per_query = torch.cat(n_relevant)[counted].double()
    protocol = {
        "name": "retrieval", "direction": direction, "similarity": "cosine",
        "relevance": how, "n_queries": n, "n_items": len(m),
        "n_train": 0, "n_test": n,                         # no training data is used
        "queries_without_relevant": int(len(q) - n),
        "mean_relevant_per_query": round(float(per_query.mean()), 3),
        "ties": "an irrelevant item scoring as high as the best relevant one ranks first",
    }
    out = {}
    for k in ks:
        out[f"{direction}_recall@{k}"] = Result(
            float((r <= k).double().mean()), f"{direction}_recall@{k}",
            {**protocol, "k": k, "definition": "fraction of queries with a relevant item in "
                                               "the top k"})
    out[f"{direction}_mrr"] = Result(
        float((1.0 / r).mean()), f"{direction}_mrr",
        {**protocol, "definition": "mean of 1 / rank of the first relevant item"})
    return out


def image_text_retrieval(image_emb, text_emb, *, relevance=None, image_groups=None,
                         text_groups=None, ks: Sequence[int] = (1, 5, 10),
                         chunk_size: int | None = None, device: torch.device | str | None = None
                         ) -> dict[str, Result]:
    """Image -> text and text -> image retrieval (recall@k and MRR both ways).

    Args:
        image_emb: (N_img, D); text_emb: (N_txt, D).
        relevance: optional boolean (N_img, N_txt) matrix (transposed for text -> image).
        image_groups, text_groups: optional group ids; an image and a text are relevant
            when their ids are equal (e.g. the attribute combination both describe).
            Without relevance or groups image i matches text i.

    Returns:
        ``{"image_to_text_recall@1": Result, ..., "text_to_image_mrr": Result}``.
    """
    rel_t = None
    if relevance is not None:
        rel = _to_tensor(relevance, "relevance")
        rel_t = rel.T if rel.ndim == 2 else rel
        relevance = rel
    out = retrieval_metrics(image_emb, text_emb, relevance=relevance,
                            query_groups=image_groups, item_groups=text_groups, ks=ks,
                            direction="image_to_text", chunk_size=chunk_size, device=device)
    out.update(retrieval_metrics(text_emb, image_emb, relevance=rel_t,
                                 query_groups=text_groups, item_groups=image_groups, ks=ks,
                                 direction="text_to_image", chunk_size=chunk_size,
                                 device=device))
    return out


def _gain_source(n_queries: int, n_items: int, relevance: object, query_groups: object,
                 item_groups: object, gain: str):
    """A function (start, stop) -> float64 (stop - start, n_items) gain block."""
    if relevance is not None:
        if query_groups is not None or item_groups is not None:
            raise ValueError("relevance: give either a relevance matrix or group ids, not both")
        rel = _to_tensor(relevance, "relevance")
        if tuple(rel.shape) != (n_queries, n_items) or rel.is_complex():
            raise ValueError(f"relevance: expected a ({n_queries}, {n_items}) matrix of "
                             f"grades >= 0 or booleans, got {rel.dtype} {tuple(rel.shape)}")
        rel = rel.double()
        if not bool(torch.isfinite(rel).all()) or bool((rel < 0).any()):
            raise ValueError("relevance: expected finite grades >= 0 (0: not relevant)")
        graded = rel if gain == "linear" else torch.exp2(rel) - 1.0
        how = "graded relevance matrix" if bool(((rel != 0) & (rel != 1)).any()) \
            else "binary relevance matrix"
        return (lambda a, b: graded[a:b]), how
    relevant, how = _relevance_source(n_queries, n_items, None, query_groups, item_groups,
                                      ("relevance", "query_groups", "item_groups"))
    return (lambda a, b: relevant(a, b).double()), how


def ndcg_at_k(queries, items, *, relevance=None, query_groups=None, item_groups=None,
              ks: Sequence[int] = (10,), gain: str = "exponential",
              direction: str = "query_to_item", chunk_size: int | None = None,
              device: torch.device | str | None = None) -> dict[str, Result]:
    """Normalised discounted cumulative gain at each k (Jarvelin & Kekalainen, 2002).

    Args:
        queries: (Q, D); items: (M, D) embeddings, ranked by cosine similarity.
        relevance: optional (Q, M) matrix: booleans, or grades >= 0 (0: not relevant).
        query_groups, item_groups: optional group ids (binary relevance: same group).
            With none of these, query i's one relevant item is item i.
        ks: cut-offs, each >= 1.
        gain: "exponential" (2^rel - 1, Burges et al., 2005) or "linear" (rel).
        direction: the prefix of the metric names.

    Queries without any relevant item (ideal DCG 0) are left out, and counted in the
    protocol. Ties are broken against the query: among items of equal score the less
    relevant ones rank first.

    Returns:
        ``{"<direction>_ndcg@<k>": Result, ...}``.
    """
    q = as_embeddings(queries, "queries")
    m = as_embeddings(items, "items", dim=q.shape[1])
    if not isinstance(ks, (list, tuple)) or not ks:
        raise ValueError(f"ks: expected a non-empty list of integers >= 1, got {ks!r}")
    ks = [check_int(k, "ks", low=1) for k in ks]
    if gain not in ("exponential", "linear"):
        raise ValueError(f"gain: expected \"exponential\" or \"linear\", got {gain!r}")
    gains, how = _gain_source(len(q), len(m), relevance, query_groups, item_groups, gain)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if chunk_size is None:
        chunk_size = max(1, _AUTO_CHUNK_ELEMENTS // len(m))
    else:
        chunk_size = check_int(chunk_size, "chunk_size", low=1)
    kmax = min(max(ks), len(m))
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64, device=device))
    items_n = F.normalize(m.to(device), dim=1)
    dcg = {k: [] for k in ks}
    idcg = {k: [] for k in ks}
    with torch.no_grad():
        for a in range(0, len(q), chunk_size):
            b = min(a + chunk_size, len(q))
            sim = F.normalize(q[a:b].to(device), dim=1) @ items_n.T          # (b - a, M)
            g = gains(a, b).to(device)
            # ties against the query: order by gain ascending, then stably by score
            by_gain = torch.sort(g, dim=1, stable=True).indices
            order = torch.sort(sim.gather(1, by_gain), dim=1, descending=True,
                               stable=True).indices[:, :kmax]
            ranked = g.gather(1, by_gain.gather(1, order))                  # (b - a, kmax)
            ideal = torch.sort(g, dim=1, descending=True).values[:, :kmax]
            for k in ks:
                kk = min(k, kmax)
                dcg[k].append((ranked[:, :kk] * discount[:kk]).sum(1).cpu())
                idcg[k].append((ideal[:, :kk] * discount[:kk]).sum(1).cpu())
    ideal_all = torch.cat(idcg[ks[0]])
    counted = ideal_all > 0
    n = int(counted.sum())
    if n == 0:
        raise ValueError("relevance: no query has a relevant item; nothing to score")
    protocol = {
        "name": "retrieval", "direction": direction, "similarity": "cosine",
        "relevance": how, "gain": "2^rel - 1" if gain == "exponential" else "rel",
        "discount": "1 / log2(rank + 1)", "reference": "Jarvelin & Kekalainen, 2002",
        "n_queries": n, "n_items": len(m), "n_train": 0, "n_test": n,
        "queries_without_relevant": int(len(q) - n),
        "ties": "among equal scores the less relevant item ranks first",
    }
    out = {}
    for k in ks:
        d, i = torch.cat(dcg[k])[counted], torch.cat(idcg[k])[counted]
        out[f"{direction}_ndcg@{k}"] = Result(
            float((d / i).mean()), f"{direction}_ndcg@{k}",
            {**protocol, "k": k, "definition": "mean over queries of DCG@k / ideal DCG@k"})
    return out


__all__ = ["first_relevant_ranks", "image_text_retrieval", "ndcg_at_k", "retrieval_metrics"]
