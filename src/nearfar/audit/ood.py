"""Out-of-domain: how much a metric drops on shifted data, and how visibly the embedding
separates the two domains.

The shifted set is corrupted or transformed copies of the in-domain items (noise, blur,
..., as in Hendrycks and Dietterich, 2019) or another dataset. The metric gap scores
both sets against the same in-domain reference (leave-one-out kNN: a copy never sees its
own source, nor its subject). The domain classifier is a logistic-regression probe
(standardised features) trained to tell in-domain from shifted embeddings on one half of
the items and scored on the other half; copies of one source item (and items of one
subject) stay on one side. AUROC near 0.5 means the embedding hides the shift; near 1,
the shift is plainly encoded (a proxy A-distance, Ben-David et al., 2007).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nearfar.audit.groups import AuditError, encode
from nearfar.audit.item_scores import knn_item_scores
from nearfar.evaluate.inputs import as_embeddings, as_labels


def domain_classifier(in_emb, shifted_emb, *, in_units=None, shifted_units=None,
                      test_fraction: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy and AUROC of a linear classifier telling the two domains apart.

    Args:
        in_emb, shifted_emb: (N, D) and (M, D) embeddings.
        in_units, shifted_units: optional unit of each row (source item, subject); rows of
            one unit go to the same side of the split. Default: every row its own unit.
        test_fraction: share of units held out.
        seed: split seed.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    a = as_embeddings(in_emb, "in_emb").numpy().astype(np.float64)
    b = as_embeddings(shifted_emb, "shifted_emb", dim=a.shape[1]).numpy().astype(np.float64)
    if in_units is None:
        in_units = np.arange(len(a))
    if shifted_units is None:
        shifted_units = np.arange(len(a), len(a) + len(b))
    units = np.concatenate([np.asarray(in_units).astype(str),
                            np.asarray(shifted_units).astype(str)])
    codes, _ = encode(list(units), "units", len(units))
    x = np.concatenate([a, b])
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))]).astype(np.int64)
    rng = np.random.default_rng(seed)
    n_units = int(codes.max()) + 1
    test_units = rng.permutation(n_units)[: max(1, int(round(test_fraction * n_units)))]
    test = np.isin(codes, test_units)
    if len(np.unique(y[test])) < 2 or len(np.unique(y[~test])) < 2:
        raise AuditError("shifted set: too few items to hold out both domains; use more items")
    mean, std = x[~test].mean(0), x[~test].std(0) + 1e-6
    clf = LogisticRegression(max_iter=1000, C=1.0)
    clf.fit((x[~test] - mean) / std, y[~test])
    score = clf.decision_function((x[test] - mean) / std)
    acc = float(((score > 0).astype(np.int64) == y[test]).mean())
    majority = float(max(y[test].mean(), 1 - y[test].mean()))
    return {
        "accuracy": acc, "auroc": float(roc_auc_score(y[test], score)),
        "majority_baseline": majority,
        "protocol": {
            "name": "domain classifier",
            "model": "logistic regression (scikit-learn, lbfgs, C = 1), features "
                     "standardised with the train half's mean / std",
            "split": f"{test_fraction:.0%} of units held out (seed {seed}); a unit's rows "
                     "stay on one side",
            "n_train": int((~test).sum()), "n_test": int(test.sum()),
            "reference": "Ben-David et al., 2007 (domain separability)",
        },
    }


def domain_shift(in_emb, in_labels, shifted_emb, shifted_labels, *, aligned: bool = False,
                 subjects=None, k: int = 10, temperature: float = 0.07,
                 shift: str = "shifted set", seed: int = 0) -> dict[str, Any]:
    """The kNN accuracy gap between in-domain and shifted items, and a domain classifier.

    Args:
        in_emb: (N, D) in-domain embeddings (also the kNN reference).
        in_labels: (N,) their labels.
        shifted_emb: (M, D) shifted embeddings.
        shifted_labels: (M,) their labels (same label space).
        aligned: True when row i of the shifted set is a copy of in-domain row i (then
            M == N and a copy never sees its source as a neighbour).
        subjects: optional (N,) subjects of the in-domain items (and of aligned copies).
        k, temperature: the kNN vote.
        shift: what the shift was, for the record.
        seed: the domain split seed.
    """
    a = as_embeddings(in_emb, "in_emb")
    b = as_embeddings(shifted_emb, "shifted_emb", dim=a.shape[1])
    ya = as_labels(in_labels, "in_labels", a.shape[0])
    yb = as_labels(shifted_labels, "shifted_labels", b.shape[0])
    if aligned and len(a) != len(b):
        raise AuditError(f"shifted_emb: expected {len(a)} rows (aligned copies of the "
                         f"in-domain items), got {len(b)}")
    ids = np.arange(len(a)) if subjects is None else encode(subjects, "subjects", len(a))[0]
    in_scores = knn_item_scores(a, ya, k=k, temperature=temperature, query_ids=ids)
    if aligned:
        sh_scores = knn_item_scores(b, yb, a, ya, k=k, temperature=temperature,
                                    query_ids=ids, reference_ids=ids)
    else:
        sh_scores = knn_item_scores(b, yb, a, ya, k=k, temperature=temperature)
    acc_in = float(in_scores["knn_correct"].mean())
    acc_shift = float(sh_scores["knn_correct"].mean())
    clf = domain_classifier(a, b, in_units=ids if aligned else None,
                            shifted_units=ids if aligned else None, seed=seed)
    return {
        "shift": shift,
        "metric": "knn_top1",
        "in_domain": acc_in, "shifted": acc_shift, "gap": acc_shift - acc_in,
        "ratio": acc_shift / acc_in if acc_in > 0 else None,
        "domain_classifier": clf,
        "protocol": {
            "name": "out-of-domain gap",
            "metric": f"leave-one-out weighted kNN top-1 (k = {k}, T = {temperature:g}) "
                      "against the in-domain items",
            "excluded": "a query's own item" + (" / source item" if aligned else "")
                        + (" and its subject" if subjects is not None else ""),
            "gap": "shifted - in-domain",
            "n_in": int(len(a)), "n_shifted": int(len(b)), "aligned_copies": aligned,
            "reference": "Hendrycks and Dietterich, 2019 (corruptions)",
        },
        "_item_scores": {"in": in_scores, "shifted": sh_scores},
    }


__all__ = ["domain_classifier", "domain_shift"]
