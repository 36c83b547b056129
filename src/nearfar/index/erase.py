"""Erasure: delete items (by id or by subject) and report what can be known about them.

    report = erase(index, ids=["17"], actor="cli:alice")
    report["training_data"]    # [{"id": "17", "in_training_data": "yes", "basis": ...}]

The deletion itself (:meth:`VectorIndex.delete`) rewrites the saved index without
the items, removes the write-ahead log and the previous snapshot, drops the search
cache and appends an audit-log entry with the salted digests of the ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nearfar.index.membership import UNLEARNING_NOTE, Membership
from nearfar.index.store import VectorIndex


def erase(index: VectorIndex, ids: Iterable[Any] = (), *, subjects: Iterable[Any] = (),
          actor: str) -> dict[str, Any]:
    """Delete and report: ``deleted``, ``not_found``, ``training_data`` (per item),
    ``subject_training_data`` (per subject), hashes before/after, ``log_seq``,
    ``cache_entries_dropped``, ``files`` (what the directory now holds) and ``note``."""
    subjects = [str(s) for s in subjects]
    report = index.delete(ids, subjects=subjects, actor=actor)
    removed = report.pop("removed")
    membership = Membership(index.training_record())
    report["training_data"] = [{"id": it.id, **membership.item(it, index.hash_id(it.id))}
                               for it in removed]
    if subjects:
        report["subject_training_data"] = {s: membership.subject(index.hash_subject(s))
                                           for s in subjects}
    report["note"] = UNLEARNING_NOTE
    return report
