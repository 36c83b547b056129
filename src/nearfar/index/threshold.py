"""The review threshold of an index: the audit's T* when the run has one, else a set value.

Every search result carries its score; a result scoring under the threshold is marked
``needs_review``. The threshold is chosen when the index is built, in this order:

1. ``--threshold`` given explicitly;
2. the audit's T*: the first key named ``t_star`` (also ``T_star``, ``tstar``,
   ``threshold_t_star``) found, searching depth-first, in the card's ``audit``
   section, then in ``RUN_DIR/audit.json``, then in ``RUN_DIR/audit/*.json``
   (sorted by name);
3. :data:`DEFAULT_THRESHOLD`, which is a placeholder, not calibrated for any encoder.

The value and where it came from are stored in the index manifest and returned with
every answer.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

DEFAULT_THRESHOLD = 0.5
T_STAR_KEYS = ("t_star", "T_star", "tstar", "threshold_t_star")


def _find_key(node: Any, path: str) -> tuple[float, str] | None:
    if isinstance(node, dict):
        for key in T_STAR_KEYS:
            value = node.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                return float(value), f"{path}.{key}" if path else key
        for key, value in node.items():
            found = _find_key(value, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _find_key(value, f"{path}[{i}]")
            if found:
                return found
    return None


def find_t_star(run_dir: str | os.PathLike | None, card: dict[str, Any] | None = None
                ) -> tuple[float, str] | None:
    """``(T*, "where it was found")`` from the run's audit records, or None."""
    if card and isinstance(card.get("audit"), (dict, list)):
        found = _find_key(card["audit"], "audit")
        if found:
            return found[0], f"audit T* from card.json: {found[1]}"
    if run_dir is None:
        return None
    run = Path(run_dir)
    candidates = [run / "audit.json"]
    if (run / "audit").is_dir():
        candidates += sorted((run / "audit").glob("*.json"))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        found = _find_key(data, "")
        if found:
            return found[0], f"audit T* from {path.relative_to(run)}: {found[1]}"
    return None


def resolve_threshold(run_dir: str | os.PathLike | None, card: dict[str, Any] | None = None,
                      explicit: float | None = None, default: float = DEFAULT_THRESHOLD
                      ) -> tuple[float, str]:
    """``(threshold, source)`` by the order in the module docstring."""
    t_star = find_t_star(run_dir, card)
    if explicit is not None:
        if not math.isfinite(explicit):
            raise ValueError(f"threshold: expected a finite number, got {explicit}")
        note = f" (overrides {t_star[1]} = {t_star[0]:g})" if t_star else ""
        return float(explicit), f"set explicitly{note}"
    if t_star:
        return t_star
    return float(default), (f"configured default {default:g} (no audit T* in the card or "
                            f"the run directory; not calibrated for this encoder)")
