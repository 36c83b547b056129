"""The index's audit log: an append-only, hash-chained JSONL file (``audit.jsonl``).

Each change to an index appends one entry::

    {"seq": 7, "time": "2026-01-02T03:04:05.678Z", "actor": "key:ab12cd34 (ingest)",
     "action": "delete", "count": 1, "ids_sha256": ["5f1c..."],
     "index_hash_before": "...", "index_hash_after": "...", "encoder_sha256": "...",
     "details": {...}, "prev": "<hash of entry 6>", "hash": "<sha256 of this entry>"}

``hash`` is the sha256 of the entry's canonical JSON without ``hash``; ``prev`` is the
previous entry's ``hash`` (64 zeros for the first). Ids and subjects appear only as
salted sha256 digests (the salt is per index), never in clear, and no vector or
metadata value is ever written here, so erasing an item leaves nothing of it in the
log but the fact and the digest of its id.

:func:`verify_entries` detects an edited line (its hash no longer matches), a removed
or reordered line (``seq`` and ``prev`` no longer follow) and, given the anchors the
index keeps in its manifest and write-ahead log, lines cut from the end.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nearfar.durable import append_line, canonical_json, read_lines, sha256_bytes

GENESIS = "0" * 64
#: beyond this many ids an entry records a digest of the hashed ids instead of the list
MAX_LISTED_IDS = 10_000


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return sha256_bytes(canonical_json(body).encode("utf-8"))


def ids_field(hashed: Sequence[str]) -> dict[str, Any]:
    """``{"ids_sha256": [...]}``, or for very large batches a digest of the sorted list."""
    if len(hashed) <= MAX_LISTED_IDS:
        return {"ids_sha256": list(hashed)}
    digest = sha256_bytes("\n".join(sorted(hashed)).encode())
    return {"ids_sha256_digest": digest}


@dataclass
class LogReport:
    """Outcome of :func:`verify_log`: ``ok`` and, if not, each problem found."""

    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "problems": list(self.problems)}


class AuditLog:
    """Appends entries to ``path`` and keeps the head (last seq and hash) in memory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.head_seq = 0
        self.head_hash = GENESIS
        self.torn_tail: tuple[int, bytes] | None = None   # (offset, bytes) of a torn last line
        self._scan()

    def _scan(self) -> None:
        lines = read_lines(self.path)
        self.torn_tail = None
        self.head_seq, self.head_hash = 0, GENESIS
        for i, (offset, raw) in enumerate(lines):
            try:
                entry = json.loads(raw)
                seq, h = int(entry["seq"]), str(entry["hash"])
            except (ValueError, KeyError, TypeError):
                if i == len(lines) - 1:
                    self.torn_tail = (offset, raw)
                    break
                continue  # verify_log reports it; the head is what follows
            self.head_seq, self.head_hash = seq, h

    def make_entry(self, *, action: str, actor: str, ids_sha256: Sequence[str],
                   index_hash_before: str, index_hash_after: str, encoder_sha256: str,
                   details: dict[str, Any] | None = None) -> dict[str, Any]:
        """The next entry (not yet written): ``seq`` and ``prev`` follow the current head."""
        entry: dict[str, Any] = {
            "seq": self.head_seq + 1,
            "time": utc_now(),
            "actor": str(actor),
            "action": action,
            "count": len(ids_sha256),
            **ids_field(ids_sha256),
            "index_hash_before": index_hash_before,
            "index_hash_after": index_hash_after,
            "encoder_sha256": encoder_sha256,
            "details": dict(details or {}),
            "prev": self.head_hash,
        }
        entry["hash"] = entry_hash(entry)
        return entry

    def append(self, entry: dict[str, Any]) -> None:
        if entry["seq"] != self.head_seq + 1 or entry["prev"] != self.head_hash:
            raise RuntimeError(f"audit log: entry {entry['seq']} does not follow the head "
                               f"{self.head_seq}; refusing to break the chain")
        append_line(self.path, canonical_json(entry))
        self.head_seq, self.head_hash = int(entry["seq"]), str(entry["hash"])


def read_entries(path: str | Path) -> list[tuple[int, dict[str, Any] | None, bytes]]:
    """``(line number, parsed entry or None, raw bytes)`` for each line of the log."""
    out = []
    for n, (_, raw) in enumerate(read_lines(path), start=1):
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                entry = None
        except ValueError:
            entry = None
        out.append((n, entry, raw))
    return out


def verify_log(path: str | Path, anchors: Iterable[dict[str, Any]] = (),
               final_index_hash: str | None = None) -> LogReport:
    """Check the hash chain of an audit log.

    Args:
        path: the ``audit.jsonl`` file.
        anchors: entries the index recorded elsewhere (its manifest, its write-ahead
            log); each must be in the log at its ``seq`` with the same hash, so lines
            cut from the end are found.
        final_index_hash: the hash of the index as loaded; the last entry's
            ``index_hash_after`` must equal it.
    """
    problems: list[str] = []
    prev, expected_seq, count = GENESIS, 1, 0
    by_seq: dict[int, str] = {}
    last: dict[str, Any] | None = None
    lines = read_entries(path)
    if not Path(path).exists():
        problems.append(f"{path}: the audit log is missing")
    for n, entry, _ in lines:
        if entry is None:
            problems.append(f"line {n}: not a JSON object (edited or truncated)")
            continue
        count += 1
        seq, stated = entry.get("seq"), entry.get("hash")
        if stated != entry_hash(entry):
            problems.append(f"line {n} (seq {seq}): content does not match its hash "
                            f"(the line was edited)")
        if seq != expected_seq:
            problems.append(f"line {n}: seq {seq} where {expected_seq} was expected "
                            f"(lines removed, inserted or reordered)")
        if entry.get("prev") != prev:
            problems.append(f"line {n} (seq {seq}): prev does not match the hash of the line "
                            f"before it (lines removed, inserted or reordered)")
        prev = str(stated)
        if isinstance(seq, int):
            by_seq[seq] = str(stated)
            expected_seq = seq + 1
        last = entry
    head_seq = last["seq"] if last else 0
    for anchor in anchors:
        seq, h = anchor.get("seq"), anchor.get("hash")
        if seq is None:
            continue
        if seq not in by_seq:
            problems.append(
                f"the index records log entry {seq} ({str(h)[:12]}...) but the log ends at "
                f"seq {head_seq}: lines were cut from the end, or the process stopped between "
                f"the index write and the log write (opening the index for writing restores "
                f"such an entry from the index's own record)")
        elif by_seq[seq] != h:
            problems.append(f"log entry {seq} differs from the one the index recorded "
                            f"(the log was rewritten)")
    if final_index_hash is not None and last is not None and not problems and \
            last.get("index_hash_after") != final_index_hash:
        problems.append("the last entry's index_hash_after does not match the index as "
                        "loaded (the index changed without a log entry)")
    return LogReport(ok=not problems, entries=count, head_seq=int(head_seq or 0),
                     head_hash=prev, problems=problems)
