"""Attribute leakage: can a linear probe read a sensitive attribute off frozen embeddings?

A linear probe (:func:`nearfar.evaluate.linear_probe`) is trained to predict the
attribute under cross-validation whose folds keep each subject's items together
(scikit-learn's StratifiedGroupKFold), so a probe cannot score by recognising a person
it saw in training. Its held-out accuracy is set against two references: the majority
baseline (always guess the train folds' most common value) and a control task (Hewitt
and Liang, 2019): the same probe, the same folds, with the attribute shuffled across
subjects, which measures what the probe achieves with no real signal. Selectivity is
probe accuracy minus control accuracy. The attribute is flagged as leaking only when the
probe beats both references by more than ``margin`` and a one-sided binomial test of the
held-out correct count against the larger reference gives p < ``alpha``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nearfar.audit.groups import AuditError, encode
from nearfar.evaluate.inputs import as_embeddings
from nearfar.evaluate.linear_probe import linear_probe


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p): the one-sided binomial test's p-value."""
    if successes <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    logs = [math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1)
            + i * math.log(p) + (trials - i) * math.log1p(-p)
            for i in range(successes, trials + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _folds(y: np.ndarray, units: np.ndarray, n_splits: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    unit_label: dict[int, int] = {}
    for u, v in zip(units.tolist(), y.tolist()):
        unit_label.setdefault(u, v)
    per_class = np.bincount(list(unit_label.values()))
    per_class = per_class[per_class > 0]
    splits = int(min(n_splits, per_class.min()))
    if splits < 2:
        raise AuditError("sensitive: every value needs at least 2 subjects (or items) to "
                         f"hold some out; got value counts {per_class.tolist()}")
    cv = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y, groups=units)), splits


def _probe_folds(x: np.ndarray, y: np.ndarray, folds, epochs: int, weight_decay: float
                 ) -> tuple[int, int, list[float]]:
    correct = total = 0
    per_fold = []
    for train, test in folds:
        if len(np.unique(y[train])) < 2:
            pred_acc = float((y[test] == y[train][0]).mean())
        else:
            pred_acc = linear_probe(x[train], y[train], x[test], y[test], epochs=epochs,
                                    weight_decay=weight_decay)["value"]
        per_fold.append(pred_acc)
        correct += int(round(pred_acc * len(test)))
        total += len(test)
    return correct, total, per_fold


def attribute_leakage(emb, sensitive, *, subjects=None, n_splits: int = 5,
                      margin: float = 0.05, alpha: float = 0.01, epochs: int = 100,
                      weight_decay: float = 1e-2, seed: int = 0) -> dict[str, Any]:
    """Linear-probe accuracy for a sensitive attribute vs majority baseline and control.

    Args:
        emb: (N, D) frozen embeddings.
        sensitive: (N,) the attribute's value per item (any values, compared as strings).
        subjects: optional (N,) subjects; folds never split a subject.
        n_splits: cross-validation folds (lowered when a value has fewer subjects).
        margin: the probe must beat max(majority, control) by more than this to flag.
        alpha: significance of the one-sided binomial test that must also pass.
        epochs, weight_decay: the probe's L-BFGS iterations and L2 penalty.
        seed: folds and shuffling seed.

    Returns:
        ``{"probe_accuracy", "majority_baseline", "control_accuracy", "selectivity",
        "advantage_over_majority", "p_value", "flagged", "per_fold": {...}, "values",
        "protocol"}``.
    """
    x = as_embeddings(emb, "emb").numpy()
    n = x.shape[0]
    y, values = encode(sensitive, "sensitive", n)
    if len(values) < 2:
        raise AuditError(f"sensitive: expected at least 2 distinct values, got {values}")
    units = np.arange(n) if subjects is None else encode(subjects, "subjects", n)[0]
    folds, splits = _folds(y, units, n_splits, seed)
    correct, total, probe_folds = _probe_folds(x, y, folds, epochs, weight_decay)
    majority_correct = 0
    majority_folds = []
    for train, test in folds:
        top = np.bincount(y[train], minlength=len(values)).argmax()
        hits = int((y[test] == top).sum())
        majority_correct += hits
        majority_folds.append(hits / len(test))
    # control task: each unit takes the attribute of another unit (a permutation of units),
    # so the attribute stays constant within a subject but carries no real signal
    rng = np.random.default_rng(seed + 1)
    unit_ids, first = np.unique(units, return_index=True)
    unit_value = y[first][rng.permutation(len(unit_ids))]
    lookup = dict(zip(unit_ids.tolist(), unit_value.tolist()))
    y_control = np.fromiter((lookup[u] for u in units.tolist()), dtype=np.int64, count=n)
    control_correct, _, control_folds = _probe_folds(x, y_control, folds, epochs,
                                                     weight_decay)
    probe = correct / total
    majority = majority_correct / total
    control = control_correct / total
    reference = max(majority, control)
    p = binomial_tail(correct, total, reference)
    flagged = bool(probe - reference > margin and p < alpha)
    return {
        "probe_accuracy": probe, "majority_baseline": majority, "control_accuracy": control,
        "selectivity": probe - control, "advantage_over_majority": probe - majority,
        "p_value": p, "flagged": flagged, "values": values,
        "per_fold": {"probe": probe_folds, "majority": majority_folds,
                     "control": control_folds},
        "protocol": {
            "name": "attribute leakage probe",
            "probe": f"nearfar linear probe (multinomial logistic regression, L-BFGS {epochs} "
                     f"iterations, weight_decay {weight_decay:g}, standardised features)",
            "splits": f"StratifiedGroupKFold, {splits} folds, grouped by "
                      f"{'subject' if subjects is not None else 'item'}, seed {seed}",
            "majority_baseline": "the train folds' most common value, scored on the test fold",
            "control": "the same probe and folds on the attribute permuted across "
                       f"{'subjects' if subjects is not None else 'items'} (Hewitt and "
                       "Liang, 2019)",
            "selectivity": "probe accuracy - control accuracy",
            "flag_rule": f"probe - max(majority, control) > {margin:g} and one-sided binomial "
                         f"p < {alpha:g} (held-out items counted as independent)",
            "n_items": n, "n_units": int(len(unit_ids)),
        },
    }


__all__ = ["attribute_leakage"]
