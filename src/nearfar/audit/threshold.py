"""Threshold sensitivity for verification-style use: "are these two the same?" answered
by cosine similarity >= t.

Genuine pairs share an identity (the subject, else the label); impostor pairs do not.
At threshold t the false match rate FMR(t) is the share of impostor pairs scoring >= t
and the false non-match rate FNMR(t) the share of genuine pairs scoring < t (ISO/IEC
19795-1). One global threshold T* is fixed at a target FMR on all impostor pairs; each
group's FMR (impostors within the group) and FNMR (genuine pairs within the group) are
then read at that same T*, and the cross-group impostor matrix gives the FMR of impostor
pairs drawn from each pair of groups (as in NIST FRVT part 3, Grother et al., 2019).
A DET curve (Martin et al., 1997) plots FNMR against FMR on normal-deviate axes.

Intervals for the per-group rates at T* come from the subject (or item) bootstrap: a
pair weighs the product of its two units' draw counts (its unit's count when both items
are of one unit); pairs themselves are never the unit. T* is held fixed across
replicates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nearfar.audit.groups import (
    AuditError,
    bootstrap_draws,
    check_confidence,
    encode,
    interval,
    units_of,
)
from nearfar.evaluate.inputs import as_embeddings

DEFAULT_TARGET_FMR = 1e-3


def build_pairs(identities: np.ndarray, *, max_pairs: int = 2_000_000, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Genuine and impostor pairs (i < j) as (P, 2) index arrays, and how they were made.

    Every pair is enumerated while there are at most ``max_pairs`` of a kind; above that
    a uniform random sample of ``max_pairs`` (seeded) is taken, and the record says so.
    """
    ids = np.asarray(identities)
    n = len(ids)
    rng = np.random.default_rng(seed)
    genuine = []
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    for members in np.split(order, bounds):
        if len(members) > 1:
            a, b = np.triu_indices(len(members), 1)
            genuine.append(np.stack([members[a], members[b]], 1))
    gen = np.concatenate(genuine) if genuine else np.zeros((0, 2), dtype=np.int64)
    gen = np.sort(gen, axis=1)
    note: dict[str, Any] = {"genuine_total": int(len(gen))}
    if len(gen) > max_pairs:
        gen = gen[np.sort(rng.choice(len(gen), max_pairs, replace=False))]
    n_all = n * (n - 1) // 2
    n_imp = n_all - note["genuine_total"]
    note["impostor_total"] = int(n_imp)
    if n_all <= max_pairs + note["genuine_total"]:
        a, b = np.triu_indices(n, 1)
        keep = ids[a] != ids[b]
        imp = np.stack([a[keep], b[keep]], 1)
        note["sampling"] = "every pair"
    else:
        draws = []
        got = 0
        while got < max_pairs:
            a = rng.integers(0, n, 2 * max_pairs)
            b = rng.integers(0, n, 2 * max_pairs)
            keep = ids[a] != ids[b]
            pair = np.sort(np.stack([a[keep], b[keep]], 1), axis=1)
            draws.append(pair)
            got += len(pair)
        imp = np.concatenate(draws)[:max_pairs]
        note["sampling"] = (f"genuine: every pair up to {max_pairs:,} (else a uniform sample); "
                            f"impostor: {max_pairs:,} pairs drawn uniformly with replacement")
    note["genuine_used"], note["impostor_used"] = int(len(gen)), int(len(imp))
    return gen.astype(np.int64), imp.astype(np.int64), note


def pair_scores(emb, pairs: np.ndarray, *, chunk: int = 1 << 18) -> np.ndarray:
    """Cosine similarity of each (i, j) pair: (P,) float64 (computed in float64)."""
    x = F.normalize(as_embeddings(emb, "emb").double(), dim=1)
    p = torch.as_tensor(pairs)
    if x.shape[0] ** 2 <= 2**26:                       # up to ~8k items: one matrix product
        sim = x @ x.T
        return sim[p[:, 0], p[:, 1]].double().numpy() if len(p) else np.zeros(0)
    out = np.empty(len(pairs))
    for a in range(0, len(pairs), chunk):
        q = p[a:a + chunk]
        out[a:a + len(q)] = (x[q[:, 0]] * x[q[:, 1]]).sum(1).double().numpy()
    return out


def error_rates(genuine: np.ndarray, impostor: np.ndarray, thresholds
                ) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, FNMR) at each threshold: accept when score >= t.

    FMR(t) = #{impostor >= t} / #impostor; FNMR(t) = #{genuine < t} / #genuine.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    imp, gen = np.sort(np.asarray(impostor, np.float64)), np.sort(np.asarray(genuine, np.float64))
    with np.errstate(all="ignore"):
        fmr = (len(imp) - np.searchsorted(imp, t, side="left")) / len(imp) if len(imp) \
            else np.full(t.shape, np.nan)
        fnmr = np.searchsorted(gen, t, side="left") / len(gen) if len(gen) \
            else np.full(t.shape, np.nan)
    return fmr, fnmr


def threshold_at_fmr(impostor: np.ndarray, target_fmr: float) -> tuple[float, float]:
    """The smallest threshold whose FMR on these impostor scores is <= ``target_fmr``,
    and the FMR it achieves.

    With m = floor(target * #impostor) false matches allowed, T* lies just above the
    (m + 1)-th largest impostor score (``numpy.nextafter``), so at most m impostors
    score >= T*. When target * #impostor < 1 no false match is allowed and T* lies just
    above the largest impostor score: the FMR actually resolved is then 0 of
    #impostor, not the target.
    """
    imp = np.sort(np.asarray(impostor, dtype=np.float64))
    if len(imp) == 0:
        raise AuditError("impostor pairs: none (every item has the same identity); T* needs "
                         "items of at least two subjects or labels")
    allowed = int(np.floor(target_fmr * len(imp) + 1e-9))
    if allowed >= len(imp):
        return float(imp[0]), 1.0
    t = float(np.nextafter(imp[len(imp) - allowed - 1], np.inf))
    fmr, _ = error_rates(np.zeros(0), imp, [t])
    return t, float(fmr[0])


def _weighted_rate(hit: np.ndarray, w_pairs: np.ndarray, cell: np.ndarray, n_cells: int
                   ) -> np.ndarray:
    """Per cell: sum of weights of pairs that hit / sum of weights (NaN where none)."""
    num = np.bincount(cell, weights=w_pairs * hit, minlength=n_cells)
    den = np.bincount(cell, weights=w_pairs, minlength=n_cells)
    with np.errstate(all="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _bootstrap_rates(u_index: np.ndarray, pair_units: np.ndarray, cell: np.ndarray,
                     hit: np.ndarray, n_cells: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_cells) rates of ``hit`` per cell under the unit bootstrap.

    A pair of two units drawn c_a and c_b times weighs c_a * c_b; a pair within one unit
    weighs c_a. Per cell the weighted sums are the bilinear forms c^T M c + v . c with M
    the (units x units) pair counts and v the within-unit pair counts, so each replicate
    costs one sparse product instead of a pass over every pair in Python.
    """
    from scipy.sparse import coo_matrix

    n_units = int(u_index.max()) + 1
    same = pair_units[:, 0] == pair_units[:, 1]
    parts = []
    for weights in (hit, np.ones(len(hit))):
        mats, vecs = [], []
        for c in range(n_cells):
            m = (cell == c) & ~same
            mats.append(coo_matrix((weights[m], (pair_units[m, 0], pair_units[m, 1])),
                                   shape=(n_units, n_units)).tocsr())
            w = (cell == c) & same
            vecs.append(np.bincount(pair_units[w, 0], weights=weights[w], minlength=n_units))
        parts.append((mats, np.stack(vecs, 1)))
    out = np.empty((n_boot, n_cells))
    row = 0
    for draws in bootstrap_draws(n_units, n_boot, seed):
        sums = []
        for mats, vecs in parts:
            bilinear = np.stack([((m.T @ draws.T).T * draws).sum(1) for m in mats], 1)
            sums.append(bilinear + draws @ vecs)
        with np.errstate(all="ignore"):
            out[row:row + len(draws)] = np.where(sums[1] > 0, sums[0] / sums[1], np.nan)
        row += len(draws)
    return out


def threshold_audit(emb, identities, groups, *, subjects=None,
                    target_fmr: float = DEFAULT_TARGET_FMR, n_points: int = 200,
                    max_pairs: int = 2_000_000, n_boot: int = 200, confidence: float = 0.95,
                    seed: int = 0) -> dict[str, Any]:
    """FMR / FNMR curves, T* at a target FMR, per-group rates at T*, the cross-group
    impostor matrix and DET points.

    Args:
        emb: (N, D) embeddings; pairs are scored by cosine similarity.
        identities: (N,) who each item is (subject ids, or class labels when no subject
            column exists): pairs of one identity are genuine, all others impostors.
        groups: (N,) the group of each item.
        subjects: optional (N,) bootstrap units (default: the items).
        target_fmr: the FMR that fixes T* (default 1e-3).
        n_points: thresholds on the FMR / FNMR / DET curves (quantiles of all scores).
        max_pairs: cap on pairs of each kind (see :func:`build_pairs`).
        n_boot: bootstrap replicates for the intervals at T* (0: none).
        confidence: interval coverage.
        seed: pair sampling and bootstrap seed.

    Returns:
        ``{"t_star", "target_fmr", "achieved_fmr", "fnmr_at_t_star", "groups": {g:
        {"fmr", "fmr_ci", "fnmr", "fnmr_ci", "fmr_ratio", "fnmr_ratio", "n_genuine",
        "n_impostor"}}, "impostor_matrix": {g: {h: FMR}}, "impostor_pairs": {g: {h: n}},
        "curves": {"threshold", "fmr", "fnmr"}, "det": {"fmr", "fnmr"}, "protocol"}``.
    """
    x = as_embeddings(emb, "emb")
    n = x.shape[0]
    id_codes, _ = encode(identities, "identities", n)
    g_codes, g_names = encode(groups, "groups", n)
    subj = None if subjects is None else encode(subjects, "subjects", n)[0]
    units, unit_name = units_of(subj, n)
    confidence = check_confidence(confidence)
    if isinstance(target_fmr, bool) or not isinstance(target_fmr, (int, float)) \
            or not 0 < float(target_fmr) < 1:
        raise AuditError(f"target_fmr: expected a number in (0, 1), got {target_fmr!r}")
    target_fmr = float(target_fmr)
    gen_pairs, imp_pairs, note = build_pairs(id_codes, max_pairs=max_pairs, seed=seed)
    if len(gen_pairs) == 0:
        raise AuditError("identities: no genuine pairs (every identity has one item); give a "
                         "subject column with several items per subject, or labels")
    gen, imp = pair_scores(x, gen_pairs), pair_scores(x, imp_pairs)
    t_star, achieved = threshold_at_fmr(imp, target_fmr)
    _, fnmr_star = error_rates(gen, imp, [t_star])

    n_groups = len(g_names)
    # cells: genuine pairs by group (both items in the group; else "mixed", dropped);
    # impostor pairs by unordered group pair
    gg = g_codes[gen_pairs]
    gen_cell = np.where(gg[:, 0] == gg[:, 1], gg[:, 0], n_groups)
    ig = np.sort(g_codes[imp_pairs], axis=1)
    imp_cell = ig[:, 0] * n_groups + ig[:, 1]
    gen_reject = (gen < t_star).astype(np.float64)
    imp_accept = (imp >= t_star).astype(np.float64)
    ones_g, ones_i = np.ones(len(gen)), np.ones(len(imp))
    fnmr_g = _weighted_rate(gen_reject, ones_g, gen_cell, n_groups + 1)[:n_groups]
    fmr_cells = _weighted_rate(imp_accept, ones_i, imp_cell, n_groups * n_groups)
    n_gen_g = np.bincount(gen_cell, minlength=n_groups + 1)[:n_groups]
    n_imp_cells = np.bincount(imp_cell, minlength=n_groups * n_groups)

    boot_fnmr = boot_fmr = None
    if n_boot:
        _, u_index = np.unique(units, return_inverse=True)
        diag_imp = np.isin(imp_cell, np.arange(n_groups) * (n_groups + 1))
        boot_fnmr = _bootstrap_rates(u_index, u_index[gen_pairs], gen_cell, gen_reject,
                                     n_groups, n_boot, seed + 1)
        boot_fmr = _bootstrap_rates(u_index, u_index[imp_pairs[diag_imp]],
                                    imp_cell[diag_imp] // (n_groups + 1), imp_accept[diag_imp],
                                    n_groups, n_boot, seed + 1)

    def ratio(a: float, b: float) -> float | None:
        return float(a / b) if b > 0 and np.isfinite(a) else None

    def num(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    per_group = {}
    for g, name in enumerate(g_names):
        d = g * n_groups + g
        per_group[name] = {
            "fmr": num(fmr_cells[d]), "fnmr": num(fnmr_g[g]),
            "fmr_ci": interval(boot_fmr[:, g], confidence) if boot_fmr is not None else None,
            "fnmr_ci": interval(boot_fnmr[:, g], confidence) if boot_fnmr is not None
            else None,
            "fmr_ratio": ratio(fmr_cells[d], achieved),
            "fnmr_ratio": ratio(fnmr_g[g], float(fnmr_star[0])),
            "n_genuine": int(n_gen_g[g]), "n_impostor": int(n_imp_cells[d]),
        }
    matrix, pair_counts = {}, {}
    for g, a in enumerate(g_names):
        matrix[a], pair_counts[a] = {}, {}
        for h, b in enumerate(g_names):
            cell = min(g, h) * n_groups + max(g, h)
            matrix[a][b] = num(fmr_cells[cell])
            pair_counts[a][b] = int(n_imp_cells[cell])

    scores = np.concatenate([gen, imp])
    grid = np.unique(np.quantile(scores, np.linspace(0, 1, max(2, n_points))))
    grid = np.unique(np.append(grid, t_star))
    fmr_curve, fnmr_curve = error_rates(gen, imp, grid)
    resolution = 1.0 / len(imp)
    protocol = {
        "name": "verification threshold sensitivity",
        "score": "cosine similarity; accept (match) when score >= threshold",
        "identity": "subject" if subjects is not None else "given identities (labels)",
        "genuine": "pairs of items of one identity",
        "impostor": "pairs of items of different identities",
        "fmr": "share of impostor pairs scoring >= t (ISO/IEC 19795-1)",
        "fnmr": "share of genuine pairs scoring < t",
        "t_star": f"the smallest threshold with FMR <= {target_fmr:g} on all impostor pairs "
                  "(one global threshold)",
        "target_fmr": target_fmr,
        "fmr_resolution": resolution,
        "target_resolved": target_fmr >= resolution,
        "group_rates": "FMR over impostor pairs with both items in the group; FNMR over "
                       "genuine pairs with both items in the group; at the global T*",
        "impostor_matrix": "FMR at T* of impostor pairs with one item in each group "
                           "(Grother et al., 2019, NIST FRVT part 3)",
        "det": "FNMR against FMR over thresholds (Martin et al., 1997)",
        "intervals": (f"{unit_name} bootstrap, {n_boot} replicates, {confidence:.0%}, T* held "
                      "fixed; pairs are never the resampled unit") if n_boot else "none",
        "pairs": note,
    }
    return {
        "t_star": t_star, "target_fmr": target_fmr, "achieved_fmr": achieved,
        "fnmr_at_t_star": float(fnmr_star[0]),
        "n_genuine": int(len(gen)), "n_impostor": int(len(imp)),
        "groups": per_group, "impostor_matrix": matrix, "impostor_pairs": pair_counts,
        "curves": {"threshold": grid.tolist(), "fmr": fmr_curve.tolist(),
                   "fnmr": fnmr_curve.tolist()},
        "det": {"fmr": fmr_curve.tolist(), "fnmr": fnmr_curve.tolist()},
        "protocol": protocol,
    }


__all__ = ["DEFAULT_TARGET_FMR", "build_pairs", "error_rates", "pair_scores",
           "threshold_at_fmr", "threshold_audit"]
