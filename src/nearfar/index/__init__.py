"""Governed retrieval: a FAISS index bound to one encoder version.

    from nearfar.index import build_index, VectorIndex, erase

    index = build_index("runs/simclr", "indexes/mnist")          # embeds the run's data
    ans = index.search(vectors, k=10, encoder_sha256=sha, where={"label": 3})
    ans["results"][0][0]    # {"id": "17", "score": 0.93, "needs_review": False, "meta": {...}}
    erase(index, ids=["17"], actor="cli:alice")                  # + training-data finding
    index.verify()                                               # audit-log hash chain

Parts: ``store`` (the index, persistence, deletion), ``auditlog`` (hash-chained log),
``filters`` (metadata equality), ``threshold`` (the review threshold), ``membership``
(was an item in the training data), ``erase``, ``build`` (from a run), ``cli``.
Needs ``faiss-cpu`` (or ``faiss-gpu``).
"""

from nearfar.index.auditlog import LogReport, verify_log
from nearfar.index.build import BoundEncoder, bind_run, build_index, weights_sha256
from nearfar.index.erase import erase
from nearfar.index.filters import parse_where
from nearfar.index.store import (
    KINDS,
    DuplicateIdError,
    EncoderMismatchError,
    IndexCorruptError,
    IndexLockedError,
    IndexStoreError,
    UnknownIdError,
    VectorIndex,
)
from nearfar.index.threshold import DEFAULT_THRESHOLD, resolve_threshold

__all__ = [
    "DEFAULT_THRESHOLD",
    "KINDS",
    "BoundEncoder",
    "DuplicateIdError",
    "EncoderMismatchError",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexStoreError",
    "LogReport",
    "UnknownIdError",
    "VectorIndex",
    "bind_run",
    "build_index",
    "erase",
    "parse_where",
    "resolve_threshold",
    "verify_log",
    "weights_sha256",
]
