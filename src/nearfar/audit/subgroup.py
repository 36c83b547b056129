"""Subgroup performance: each metric per group, with bootstrap intervals over items or
subjects, the gap and ratio of each group to the whole, and the gaps between groups.

A metric here is the mean of per-item scores (kNN correctness, neighbour precision; see
:mod:`nearfar.audit.item_scores`), so a group's value is the mean over its items and
every interval comes from one cluster bootstrap (Efron and Tibshirani, 1993; Field and
Welsh, 2007 for clustered data): each replicate redraws whole subjects (or items, when
no subject column is given) with replacement and recomputes every group, the overall
value, and their gaps and ratios from the same draw, so a gap's interval accounts for
the correlation between a group and the whole it belongs to. Pairs are never resampled:
images of one subject are not independent, and treating them as such gives intervals
that are too narrow (tests/test_audit.py measures by how much).

A group is flagged when the whole interval of its gap to the overall value lies below
``-margin``: it is worse than the rest by more than the margin, beyond resampling noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nearfar.audit.groups import (
    AuditError,
    bootstrap_draws,
    check_confidence,
    encode,
    interval,
    units_of,
)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(b > 0, a / b, np.nan)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def subgroup_performance(scores: Mapping[str, Sequence[float] | np.ndarray], groups, *,
                         subjects=None, n_boot: int = 1000, confidence: float = 0.95,
                         margin: float = 0.02, seed: int = 0, min_items: int = 5
                         ) -> dict[str, Any]:
    """Per-group values of per-item metrics, with cluster-bootstrap intervals and flags.

    Args:
        scores: metric name -> (N,) per-item scores whose mean is the metric (higher is
            better), e.g. ``knn_item_scores(...)``.
        groups: (N,) group of each item (any values; compared as strings).
        subjects: optional (N,) subject of each item; the bootstrap then draws subjects
            (all of a subject's items together) instead of items.
        n_boot: bootstrap replicates.
        confidence: interval coverage, e.g. 0.95 for 2.5th-97.5th percentiles.
        margin: a group is flagged when its gap-to-overall interval lies wholly below
            ``-margin``.
        seed: the bootstrap's random seed.
        min_items: groups with fewer items are reported but never flagged.

    Returns:
        ``{"metrics": {name: {"overall": {...}, "groups": {g: {...}}, "between_groups":
        {...}}}, "flags": [...], "groups": [...], "protocol": {...}}``; each group holds
        value, interval, gap, gap interval, ratio, ratio interval, n_items, n_units (the
        resampled units in the group: subjects, or items),
        flagged.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise AuditError("scores: expected a dict of metric name -> per-item scores")
    first = np.asarray(next(iter(scores.values())), dtype=np.float64)
    n = first.shape[0]
    g_codes, g_names = encode(groups, "groups", n)
    if len(g_names) < 2:
        raise AuditError(f"groups: expected at least 2 distinct groups to compare, got "
                         f"{g_names}")
    subj = None if subjects is None else encode(subjects, "subjects", n)[0]
    units, unit_name = units_of(subj, n)
    confidence = check_confidence(confidence)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 50:
        raise AuditError(f"n_boot: expected an integer >= 50, got {n_boot!r}")
    if not isinstance(margin, (int, float)) or margin < 0:
        raise AuditError(f"margin: expected a number >= 0, got {margin!r}")

    n_groups = len(g_names)
    onehot = np.zeros((n, n_groups))
    onehot[np.arange(n), g_codes] = 1.0
    sizes = onehot.sum(0)
    n_units_g = [int(len(np.unique(units[g_codes == g]))) for g in range(n_groups)]
    # per-unit totals: a replicate's group sums are its draw counts times these
    _, unit_index = np.unique(units, return_inverse=True)
    n_units = int(unit_index.max()) + 1
    unit_count = np.zeros((n_units, n_groups))
    np.add.at(unit_count, unit_index, onehot)
    draws = list(bootstrap_draws(n_units, n_boot, seed))
    boot_count = np.concatenate([d @ unit_count for d in draws])            # (B, G)

    out: dict[str, Any] = {}
    flags: list[dict[str, Any]] = []
    for metric, values in scores.items():
        s = np.asarray(values, dtype=np.float64).reshape(-1)
        if s.shape[0] != n or not np.isfinite(s).all():
            raise AuditError(f"scores[{metric!r}]: expected {n} finite per-item scores, got "
                             f"{s.shape[0]}")
        point_group = (onehot * s[:, None]).sum(0) / sizes               # (G,)
        point_all = float(s.mean())
        unit_sum = np.zeros((n_units, n_groups))
        np.add.at(unit_sum, unit_index, onehot * s[:, None])
        boot_sum = np.concatenate([d @ unit_sum for d in draws])          # (B, G)
        with np.errstate(all="ignore"):
            boot_group = boot_sum / boot_count                            # NaN if absent
            boot_all = boot_sum.sum(1) / boot_count.sum(1)                # (B,)
        boot_gap = boot_group - boot_all[:, None]
        boot_ratio = _ratio(boot_group, boot_all[:, None])
        groups_out: dict[str, Any] = {}
        for g, name in enumerate(g_names):
            gap_ci = interval(boot_gap[:, g], confidence)
            flagged = bool(sizes[g] >= min_items and gap_ci[1] is not None
                           and gap_ci[1] < -margin)
            groups_out[name] = {
                "value": float(point_group[g]),
                "ci": interval(boot_group[:, g], confidence),
                "gap": float(point_group[g] - point_all),
                "gap_ci": gap_ci,
                "ratio": _finite(point_group[g] / point_all) if point_all > 0 else None,
                "ratio_ci": interval(boot_ratio[:, g], confidence),
                "n_items": int(sizes[g]),
                "n_units": n_units_g[g],
                "flagged": flagged,
            }
            if flagged:
                flags.append({
                    "kind": "subgroup", "metric": metric, "group": name,
                    "value": float(point_group[g]), "overall": point_all,
                    "gap": float(point_group[g] - point_all), "gap_ci": gap_ci,
                    "why": f"{metric} of group {name!r} is {point_group[g]:.3f} against "
                           f"{point_all:.3f} overall; the {confidence:.0%} interval of the "
                           f"gap, [{gap_ci[0]:.3f}, {gap_ci[1]:.3f}], lies below "
                           f"-{margin:g}"})
        with np.errstate(all="ignore"):
            best, worst = int(np.argmax(point_group)), int(np.argmin(point_group))
            boot_spread = np.nanmax(boot_group, 1) - np.nanmin(boot_group, 1)
            boot_min_ratio = _ratio(np.nanmin(boot_group, 1), np.nanmax(boot_group, 1))
        pairwise = {a: {b: float(point_group[i] - point_group[j])
                        for j, b in enumerate(g_names)} for i, a in enumerate(g_names)}
        out[metric] = {
            "overall": {"value": point_all, "ci": interval(boot_all, confidence),
                        "n_items": n, "n_units": int(len(np.unique(units)))},
            "groups": groups_out,
            "between_groups": {
                "best": g_names[best], "worst": g_names[worst],
                "max_gap": float(point_group[best] - point_group[worst]),
                "max_gap_ci": interval(boot_spread, confidence),
                "min_ratio": _finite(point_group[worst] / point_group[best])
                if point_group[best] > 0 else None,
                "min_ratio_ci": interval(boot_min_ratio, confidence),
                "pairwise_gap": pairwise,
            },
        }
    protocol = {
        "name": "subgroup performance",
        "bootstrap": f"percentile, {n_boot} replicates, {confidence:.0%} intervals, seed {seed}",
        "resampled_unit": unit_name,
        "unit_note": ("whole subjects are drawn with replacement (all their items together)"
                      if unit_name == "subject" else
                      "items are drawn with replacement (no subject column given: items are "
                      "taken as independent)"),
        "pairs_resampled": False,
        "gap": "group value - overall value, from the same replicate",
        "ratio": "group value / overall value",
        "max_gap": "best group - worst group (per replicate: max - min over groups)",
        "flag_rule": f"gap interval wholly below -{margin:g} (group size >= {min_items})",
        "margin": margin,
        "reference": "Efron and Tibshirani, 1993 (bootstrap); Field and Welsh, 2007 "
                     "(clustered bootstrap)",
    }
    return {"metrics": out, "flags": flags, "groups": g_names, "protocol": protocol}


__all__ = ["subgroup_performance"]
