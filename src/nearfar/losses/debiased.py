"""Debiased and hard-negative InfoNCE for the two-view (SimCLR) layout.

Debiased contrastive learning (Chuang et al., 2020) corrects the negative term for the
same-class samples hiding among the "negatives"; hard negative sampling (Robinson et
al., 2021) additionally importance-weights negatives by how similar they are to the
anchor. Both work on 2N anchors: views z1[i] and z2[i] are each other's positive, the
other 2N - 2 views are the candidate negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_fraction, check_mask, check_nonnegative, check_pair, check_positive_scalar
from .masks import same_value_mask

__all__ = ["debiased_info_nce", "hard_negative_info_nce", "same_value_mask"]


def debiased_info_nce(z1: Tensor, z2: Tensor, *, temperature: float | Tensor = 0.5,
                      tau_plus: float = 0.1, exclude: Tensor | None = None) -> Tensor:
    """Debiased contrastive loss (Chuang et al., 2020), SimCLR two-view layout.

    For anchor i with positive score ``pos = exp(s_ip / t)`` and the M = 2N - 2 negative
    scores ``neg_k = exp(s_ik / t)`` (s cosine similarity):

        N_g = max((sum_k neg_k - tau_plus * M * pos) / (1 - tau_plus), M * e^(-1/t))
        loss_i = -log(pos / (pos + N_g))

    ``tau_plus`` is the class prior: the probability that a "negative" shares the anchor's
    class. ``tau_plus = 0`` gives the NT-Xent loss (the floor is then never active).

    Args:
        z1, z2: (N, D) embeddings of two views, N >= 2; normalised inside.
        temperature: > 0.
        tau_plus: class prior in [0, 1).
        exclude: optional boolean (2N, 2N) mask over [z1; z2] x [z1; z2] of known false
            negatives (same image id, duplicates, same label; see ``same_value_mask``);
            they are dropped from the negatives and M counts the rest, per anchor. Entries
            on the diagonal and at the positive partner are ignored.

    Returns:
        Scalar loss, the mean over the 2N anchors.
    """
    return hard_negative_info_nce(z1, z2, temperature=temperature, tau_plus=tau_plus,
                                  beta=0.0, exclude=exclude)


def hard_negative_info_nce(z1: Tensor, z2: Tensor, *, temperature: float | Tensor = 0.5,
                           tau_plus: float = 0.1, beta: float = 1.0,
                           exclude: Tensor | None = None) -> Tensor:
    """Contrastive loss with hard negative sampling (Robinson et al., 2021).

    The debiased loss of Chuang et al. (2020) with the negatives importance-weighted by
    ``w_k = exp(beta * s_ik / t) / mean_k exp(beta * s_ik / t)`` (the weighting of the
    authors' reference code, which folds the temperature into the similarity):

        N_g = max((sum_k w_k neg_k - tau_plus * M * pos) / (1 - tau_plus), M * e^(-1/t))
        loss_i = -log(pos / (pos + N_g))

    ``beta = 0`` is the debiased loss; ``beta = 0, tau_plus = 0`` is NT-Xent.

    Args:
        z1, z2: (N, D) embeddings of two views, N >= 2; normalised inside.
        temperature: > 0.
        tau_plus: class prior in [0, 1).
        beta: concentration >= 0; larger puts more weight on the hardest negatives.
        exclude: optional boolean (2N, 2N) mask of known false negatives, as in
            :func:`debiased_info_nce`.

    Returns:
        Scalar loss, the mean over the 2N anchors.
    """
    z1, z2 = check_pair(z1, z2, "z1", "z2", min_rows=2)
    check_positive_scalar(temperature, "temperature")
    tau_plus = check_fraction(tau_plus, "tau_plus")
    check_nonnegative(beta, "beta")
    n = z1.shape[0]
    if exclude is not None:
        exclude = check_mask(exclude, "exclude", 2 * n, 2 * n, z1.device)

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature                                   # (2N, 2N)
    rows = torch.arange(2 * n, device=z.device)
    partner = (rows + n) % (2 * n)
    l_pos = logits[rows, partner]                                    # (2N,)
    negative = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    negative[rows, partner] = False
    if exclude is not None:
        negative &= ~exclude
    count = negative.sum(1).to(logits.dtype)                         # M per anchor

    # shift every row by its largest candidate logit: all exponentials are <= 1 and
    # pos + N_g >= min(1, ...) > 0, so nothing overflows and the log stays finite
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    shift = torch.maximum(torch.where(negative, logits, neg_inf).amax(1), l_pos).detach()
    pos = torch.exp(l_pos - shift)
    neg = torch.exp(torch.where(negative, logits - shift[:, None], neg_inf))
    if beta == 0:
        weighted = neg.sum(1)
    else:
        # w / mean(w) over the negatives = M * softmax(beta * logits) over the negatives
        w_logits = torch.where(negative, beta * logits, neg_inf)
        w_logits = torch.where(negative.any(1, keepdim=True), w_logits, 0.0)
        weights = torch.softmax(w_logits, dim=1) * negative
        weighted = count * (weights * neg).sum(1)
    floor = count * torch.exp(-1.0 / temperature - shift)
    n_g = torch.maximum((weighted - tau_plus * count * pos) / (1.0 - tau_plus), floor)
    return (torch.log(pos + n_g) - (l_pos - shift)).mean()
