"""How many dimensions an embedding actually uses: RankMe and the numerical rank.

A collapsed or dimensionally collapsed encoder puts its embeddings in a low-dimensional
subspace of its D outputs; its downstream accuracy follows (Garrido, Balestriero, Najman
& LeCun, 2023, "RankMe: Assessing the Downstream Performance of Pretrained
Self-Supervised Representations by Their Rank", ICML).

* RankMe, the effective rank (Roy & Vetterli, 2007): with singular values s_1..s_min(N,D)
  of the (N, D) embedding matrix and p_k = s_k / sum(s) + eps,

      RankMe = exp(-sum_k p_k log p_k),

  a smooth count between 1 (one direction) and min(N, D) (all directions equal);
* the numerical rank: the number of s_k > tol * s_1 (a stated relative tolerance).

    r = rank_metrics(test_emb)    # {"effective_rank": Result, "numerical_rank": Result}
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nearfar.evaluate.inputs import as_embeddings, check_positive
from nearfar.evaluate.result import Result

#: eps of the RankMe paper (added to each normalised singular value)
RANKME_EPS = 1e-7


def singular_values(emb, *, center: bool = False) -> Tensor:
    """Singular values (float64, descending) of the (N, D) embedding matrix; the rows are
    taken as given (RankMe does not normalise or centre them) unless ``center``."""
    x = as_embeddings(emb, "emb").double()
    if center:
        x = x - x.mean(0, keepdim=True)
    return torch.linalg.svdvals(x)


def _protocol(x: Tensor, center: bool) -> dict:
    return {"name": "rank", "n_train": 0, "n_test": int(x.shape[0]),
            "embedding_dim": int(x.shape[1]), "max_rank": int(min(x.shape)),
            "rows": "centred" if center else "as given (not normalised, not centred)",
            "svd": "float64"}


def effective_rank(emb, *, eps: float = RANKME_EPS, center: bool = False) -> Result:
    """RankMe, exp of the entropy of the normalised singular values (Garrido et al., 2023).

    Args:
        emb: (N, D) embeddings.
        eps: added to each normalised singular value (paper: 1e-7).
        center: subtract the mean row first (the paper does not).

    Returns:
        A Result in [1, min(N, D)] (up to eps); 0 singular values everywhere (all rows
        zero) gives 1.
    """
    x = as_embeddings(emb, "emb")
    eps = float(eps) if eps == 0 else check_positive(eps, "eps")
    s = singular_values(x, center=center)
    total = float(s.sum())
    if total == 0.0:
        value = 1.0
    else:
        p = s / total + eps
        value = math.exp(float(-(p * p.log()).sum()))
    return Result(value, "effective_rank", {
        **_protocol(x, center), "reference": "Garrido et al., 2023 (RankMe)",
        "definition": "exp(-sum p_k log p_k), p_k = s_k / sum(s) + eps", "eps": eps})


def numerical_rank(emb, *, tol: float = 1e-3, center: bool = False) -> Result:
    """The number of singular values above ``tol`` times the largest.

    Args:
        emb: (N, D) embeddings.
        tol: relative tolerance in (0, 1).
        center: subtract the mean row first.
    """
    x = as_embeddings(emb, "emb")
    tol = check_positive(tol, "tol")
    if tol >= 1:
        raise ValueError(f"tol: expected a relative tolerance in (0, 1), got {tol}")
    s = singular_values(x, center=center)
    value = int((s > tol * s[0]).sum()) if float(s[0]) > 0 else 0
    return Result(float(value), "numerical_rank", {
        **_protocol(x, center), "tolerance": f"s_k > {tol:g} * s_max", "tol": tol,
        "definition": "count of singular values above the tolerance"})


def rank_metrics(emb, *, tol: float = 1e-3, eps: float = RANKME_EPS, center: bool = False
                 ) -> dict[str, Result]:
    """``{"effective_rank": RankMe, "numerical_rank": count above tol * s_max}``."""
    return {"effective_rank": effective_rank(emb, eps=eps, center=center),
            "numerical_rank": numerical_rank(emb, tol=tol, center=center)}


__all__ = ["RANKME_EPS", "effective_rank", "numerical_rank", "rank_metrics", "singular_values"]
