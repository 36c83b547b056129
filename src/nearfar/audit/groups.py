"""Turning metadata columns (groups, subjects, sensitive attributes) into integer codes,
and the resampling weights of the subject-level bootstrap every audit interval uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class AuditError(ValueError):
    """An audit cannot run as asked (a missing column, too few groups, no pairs, ...)."""


def encode(values: Sequence[Any] | np.ndarray | Any, name: str, n: int
           ) -> tuple[np.ndarray, list[str]]:
    """Integer codes (n,) and the sorted names they stand for, from one value per item.

    Values are compared as strings, so ``1`` and ``"1"`` are the same group; ``None``
    becomes ``"missing"``.
    """
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise AuditError(f"{name}: expected one value per item ({n}), got "
                         f"{type(values).__name__}")
    if len(values) != n:
        raise AuditError(f"{name}: expected {n} values (one per embedding row), got "
                         f"{len(values)}")
    text = ["missing" if v is None else str(v) for v in values]
    names = sorted(set(text), key=_natural)
    lookup = {v: i for i, v in enumerate(names)}
    return np.fromiter((lookup[v] for v in text), dtype=np.int64, count=n), names


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def bootstrap_draws(n_units: int, n_boot: int, seed: int, *, block: int = 64):
    """Draw counts of a cluster bootstrap, ``block`` replicates at a time.

    Each replicate draws ``n_units`` units (subjects, or items when every item is its
    own unit) with replacement; yields (b, n_units) float arrays of how often each unit
    was drawn, b <= block, n_boot rows in all. An item then weighs its unit's count.
    Pairs are never the unit. Memory is O(block x n_units) whatever n_boot is.
    """
    rng = np.random.default_rng(seed)
    p = np.full(n_units, 1.0 / n_units)
    for start in range(0, n_boot, block):
        yield rng.multinomial(n_units, p, size=min(block, n_boot - start)).astype(np.float64)


def units_of(subjects: np.ndarray | None, n: int) -> tuple[np.ndarray, str]:
    """The bootstrap unit of every item: its subject code, or the item itself."""
    if subjects is None:
        return np.arange(n), "item"
    return np.asarray(subjects), "subject"


def interval(samples: np.ndarray, confidence: float) -> list[float | None]:
    """Percentile interval over axis 0, ignoring NaN (replicates where a group was not
    drawn); None when every replicate is NaN."""
    tail = (1.0 - confidence) / 2 * 100
    with np.errstate(all="ignore"):
        finite = np.isfinite(samples)
        if samples.ndim == 1:
            if not finite.any():
                return [None, None]
            lo, hi = np.nanpercentile(samples, [tail, 100 - tail])
            return [float(lo), float(hi)]
    raise ValueError("samples: expected a 1-D array of bootstrap replicates")


def check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
            or not 0.5 <= float(confidence) < 1.0:
        raise AuditError(f"confidence: expected a number in [0.5, 1), got {confidence!r}")
    return float(confidence)


__all__ = ["AuditError", "bootstrap_draws", "check_confidence", "encode", "interval",
           "units_of"]
