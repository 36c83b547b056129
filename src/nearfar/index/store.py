"""A FAISS vector index bound to one encoder version: metadata, filters, erasure, audit log.

An index directory holds::

    manifest.json         format, encoder binding (weights sha256), kind and parameters,
                          threshold, per-index salt, generation, the sha256 and size of
                          every snapshot file, the index hash, the last audit-log entry
    index-000007.faiss    the FAISS index of the current generation (vectors keyed by an
                          internal int64 key)
    items-000007.jsonl    one line per item: key, id, metadata, item hash
    wal.jsonl             write-ahead log: adds since the snapshot (each fsynced before
                          the add returns)
    audit.jsonl           the hash-chained audit log (:mod:`nearfar.index.auditlog`)
    training_record.json  salted digests of the encoder's training items, when known
    lock                  held (flock) by the one process that has the index open to write

Durability: an add is acknowledged only after its write-ahead record is fsynced; a
bulk add, a deletion and a compaction write a new generation of snapshot files (temp
file, fsync, rename), then the manifest (the same way), then remove the write-ahead
log and the previous generation. A crash at any moment leaves a loadable index that
holds every acknowledged add; on the next writable open, a torn last write-ahead record
(never acknowledged) is dropped and an audit entry whose change was committed but whose
log line was not yet written is appended from the index's own copy.

Erasure: a deletion always writes a new snapshot without the deleted vectors and
metadata and removes the write-ahead log and the old generation, so no file left in
the directory holds them (HNSW cannot remove a node, so the deleted node's stored
vector is overwritten with zeros and the node is excluded from every search; the
graph is rebuilt without such nodes once they pass ``rebuild_fraction`` of the index;
until then the graph's links still record which items the deleted node was near). IVF
centroids are k-means means of the vectors the index was built with (``nlist`` is at
most n / 39) and are not retrained on deletion; rebuild the index to retrain them.

The index hash is an incremental multiset hash (the sum modulo 2**256 of each item's
sha256 over id, metadata and vector, bound to the encoder hash): equal contents give
equal hashes whatever the order of operations, and adding or deleting costs O(batch).
"""

from __future__ import annotations

import base64
import json
import math
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nearfar.durable import (
    TMP_MARK,
    append_line,
    atomic_write,
    atomic_write_json,
    canonical_json,
    fsync_dir,
    read_lines,
    sha256_bytes,
    sha256_file,
    truncate_to,
)
from nearfar.index.auditlog import GENESIS, AuditLog, utc_now, verify_log
from nearfar.index.filters import normalise_where, value_key

try:  # POSIX advisory locks; elsewhere the single-writer rule is not enforced
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT = "nearfar-index/1"
MANIFEST = "manifest.json"
WAL = "wal.jsonl"
LOG = "audit.jsonl"
LOCK = "lock"
TRAINING_RECORD = "training_record.json"
KINDS = ("flat", "ivf", "hnsw")
#: batches at least this large are written as a snapshot instead of a write-ahead record
BULK_ADD = 4096
#: the write-ahead log is folded into a new snapshot past this size
WAL_COMPACT_BYTES = 64 << 20
#: filters that match at most this many items are scored exactly (ANN kinds)
EXACT_FILTER_MAX = 4096
MAX_K = 10_000
#: IVF k-means trains on at most this many vectors per list (a seeded sample)
IVF_TRAIN_PER_LIST = 64
MAX_ID_CHARS = 512
CACHE_SIZE = 1024
_MOD = 1 << 256


class IndexStoreError(ValueError):
    """Something about an index a user can act on."""


class EncoderMismatchError(IndexStoreError):
    """Vectors or a query from another encoder version than the one the index is bound to."""


class DuplicateIdError(IndexStoreError):
    """An add names an id the index already holds (delete it first to replace it)."""


class UnknownIdError(IndexStoreError):
    """A deletion or lookup names ids the index does not hold."""


class IndexCorruptError(IndexStoreError):
    """A file of the index is missing, truncated or does not match the manifest."""


class IndexLockedError(IndexStoreError):
    """Another process has the index open for writing."""


# ---------------------------------------------------------------------- items and hashes

@dataclass(slots=True)
class Item:
    """One indexed item. ``content``: salted sha256 of its image bytes, when known;
    ``source``: sha256 of the dataset it was indexed from, when known."""

    key: int
    id: str
    meta: dict[str, Any]
    h: str
    content: str | None = None
    source: str | None = None
    line: str | None = None      # its line in the items file, once serialised

    def serialised(self) -> str:
        if self.line is None:
            self.line = canonical_json(self.to_json())
        return self.line

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "id": self.id, "meta": self.meta, "h": self.h}
        if self.content is not None:
            out["content"] = self.content
        if self.source is not None:
            out["source"] = self.source
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any], line: str | None = None) -> Item:
        return cls(int(d["key"]), str(d["id"]), dict(d["meta"]), str(d["h"]),
                   d.get("content"), d.get("source"), line)


def item_hash(item_id: str, meta: Mapping[str, Any], vector: np.ndarray) -> str:
    head = canonical_json([item_id, meta]).encode("utf-8")
    return sha256_bytes(head + b"\x00" + np.ascontiguousarray(vector, "<f4").tobytes())


def salted_sha256(salt: bytes, kind: str, payload: bytes) -> str:
    """sha256(salt | kind | 0x00 | payload): how ids, subjects and image contents are
    recorded (the salt is per index, so digests cannot be compared across indexes)."""
    return sha256_bytes(salt + kind.encode() + b"\x00" + payload)


def content_bytes(image: np.ndarray) -> bytes:
    """What a content digest covers: the uint8 (C, H, W) image's shape, then its bytes."""
    a = np.ascontiguousarray(image, dtype=np.uint8)
    return str(a.shape).encode() + a.tobytes()


def state_hash(encoder_sha256: str, adhash: int) -> str:
    return sha256_bytes(f"{FORMAT}|{encoder_sha256}|{adhash:064x}".encode())


def default_params(kind: str, n: int) -> dict[str, Any]:
    """Parameters for ``kind`` at ``n`` items (overridable one by one)."""
    if kind == "flat":
        return {}
    if kind == "ivf":
        nlist = max(1, min(int(math.sqrt(max(n, 1))), max(1, n // 39)))
        return {"nlist": nlist, "nprobe": min(16, nlist)}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 64, "rebuild_fraction": 0.1}
    raise IndexStoreError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover
        raise IndexStoreError("nearfar.index needs faiss: pip install faiss-cpu") from None
    return faiss


def _new_faiss_index(kind: str, dim: int, params: Mapping[str, Any],
                     train: np.ndarray | None):
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(params["ef_construction"])
        return faiss.IndexIDMap2(inner)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1      # small indexes: no "too few points" warning
    if train is None or len(train) < int(params["nlist"]):
        raise IndexStoreError(f"kind ivf: training needs at least nlist={params['nlist']} "
                              f"vectors, got {0 if train is None else len(train)}; build the "
                              f"index from data, or use kind flat")
    cap = IVF_TRAIN_PER_LIST * int(params["nlist"])
    if len(train) > cap:     # k-means on a seeded sample: minutes saved at millions of items
        train = train[np.random.default_rng(0).choice(len(train), cap, replace=False)]
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)   # reconstruct and remove by key
    return index


def as_matrix(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """(N, dim) float32, L2-normalised, finite; ValueError naming ``what`` otherwise."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().numpy()
    try:
        x = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise IndexStoreError(f"{what}: expected numbers, got {type(vectors).__name__}") from None
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise IndexStoreError(f"{what}: expected shape (N, {dim}), got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise IndexStoreError(f"{what}: expected finite numbers, got NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise IndexStoreError(f"{what}: row {int(np.argmin(norms))} is all zeros; cannot "
                              f"be L2-normalised")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _plain_meta(meta: Any, where: str) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise IndexStoreError(f"{where}: expected an object of metadata, got "
                              f"{type(meta).__name__}")
    out = {}
    for k, v in meta.items():
        if not isinstance(k, str):
            raise IndexStoreError(f"{where}: expected string keys, got {k!r}")
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        out[k] = v
    try:
        return json.loads(canonical_json(out))
    except (TypeError, ValueError) as exc:
        raise IndexStoreError(f"{where}: metadata must be plain JSON ({exc})") from None


# ---------------------------------------------------------------------- the index

class VectorIndex:
    """A persistent FAISS index of L2-normalised vectors keyed by item id.

    Use :meth:`create` or :meth:`open`; all methods are thread-safe. Scores are inner
    products of L2-normalised vectors (cosine similarity, in [-1, 1]).
    """

    def __init__(self) -> None:  # use create() / open()
        raise TypeError("use VectorIndex.create(...) or VectorIndex.open(...)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def _blank(cls, path: Path, writable: bool) -> VectorIndex:
        self = object.__new__(cls)
        self.path = path
        self.writable = writable
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        self._cache: OrderedDict[tuple, list[tuple[int, float]]] = OrderedDict()
        self._selectors: dict[str, tuple[set[int], Any]] = {}   # filter -> (keys, IDSelector)
        #: OpenMP threads for each search, set in the calling thread (None: FAISS's default).
        #: One query gains nothing from more, and on a busy machine 2+ threads wait on
        #: each other: a service answering many requests at once should use 1.
        self.search_threads: int | None = None
        self._fields: dict[str, dict[str, set[int]]] = {}
        self._items: dict[str, Item] = {}
        self._by_key: dict[int, Item] = {}
        self._tombstones: set[int] = set()
        self._adhash = 0
        self._wal_records = 0
        self._training: dict[str, Any] | None = None
        self._training_sets: dict[str, frozenset[str]] | None = None
        return self

    @classmethod
    def create(cls, path: str | os.PathLike, *, dim: int, encoder: Mapping[str, Any],
               kind: str = "flat", params: Mapping[str, Any] | None = None,
               threshold: float = 0.5, threshold_source: str = "configured default",
               subject_field: str = "subject", train_vectors: Any = None,
               training_record: Mapping[str, Any] | None = None,
               salt: str | None = None, actor: str = "unknown") -> VectorIndex:
        """A new, empty index directory bound to ``encoder["weights_sha256"]``.

        Args:
            dim: embedding dimension.
            encoder: at least ``weights_sha256``; ``architecture``, ``embedding_dim``,
                ``run_dir``, ``card_name`` are recorded too.
            kind: ``flat`` (exact), ``ivf`` (needs ``train_vectors``) or ``hnsw``.
            params: overrides of :func:`default_params` (``nlist``, ``nprobe``, ``M``,
                ``ef_construction``, ``ef_search``, ``rebuild_fraction``).
            threshold, threshold_source: results scoring below ``threshold`` are
                marked ``needs_review``; the source says where the value came from.
            subject_field: the metadata field deletions ``--subject`` match.
            training_record: see :mod:`nearfar.index.membership` (made with ``salt``).
            salt: 64 hex characters for the salted digests (default: fresh random).
        """
        path = Path(path)
        if kind not in KINDS:
            raise IndexStoreError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        sha = str(encoder.get("weights_sha256") or "")
        if len(sha) != 64:
            raise IndexStoreError("encoder.weights_sha256: expected the 64-hex sha256 of the "
                                  f"encoder's weights, got {sha!r}")
        if not isinstance(dim, int) or dim < 1:
            raise IndexStoreError(f"dim: expected a positive integer, got {dim!r}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise IndexStoreError(f"threshold: expected a finite number, got {threshold!r}")
        if path.exists() and any(path.iterdir()):
            raise IndexStoreError(f"{path}: exists and is not empty; choose a new index "
                                  f"directory (or delete this one)")
        path.mkdir(parents=True, exist_ok=True)
        n_train = 0 if train_vectors is None else len(train_vectors)
        full_params = {**default_params(kind, n_train), **dict(params or {})}
        self = cls._blank(path, writable=True)
        self._acquire()
        train = None if train_vectors is None else as_matrix(train_vectors, dim, "train_vectors")
        self._faiss = _new_faiss_index(kind, dim, full_params, train)
        self.manifest = {
            "format": FORMAT,
            "created": utc_now(),
            "kind": kind,
            "dim": dim,
            "metric": "inner product of L2-normalised vectors (cosine)",
            "params": full_params,
            "encoder": {k: v for k, v in dict(encoder).items() if v is not None},
            "threshold": {"value": float(threshold), "source": threshold_source},
            "subject_field": subject_field,
            "salt": salt or secrets.token_hex(32),
            "generation": 0,
            "next_key": 0,
            "count": 0,
            "files": {},
        }
        self._apply_runtime_params()
        if training_record is not None:
            self.manifest["files"][TRAINING_RECORD] = atomic_write_json(
                path / TRAINING_RECORD, dict(training_record))
        self._log = AuditLog(path / LOG)
        entry = self._log.make_entry(
            action="create", actor=actor, ids_sha256=[], index_hash_before=GENESIS,
            index_hash_after=self.index_hash, encoder_sha256=sha,
            details={"kind": kind, "params": full_params, "dim": dim,
                     "threshold": self.manifest["threshold"]})
        self._last_entry = entry
        self._write_snapshot(entry)
        return self

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = True,
             verify_files: bool = True) -> VectorIndex:
        """Load an index directory (writable: take its lock and repair after a crash)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise IndexStoreError(f"{path}: not an index directory (no {MANIFEST}); make one "
                                  f"with `nearfar index build`")
        self = cls._blank(path, writable)
        if writable:
            self._acquire()
        last_error: Exception | None = None
        for _ in range(3):   # a read-only open can race a compaction that swaps files
            try:
                self._load(verify_files)
                return self
            except FileNotFoundError as exc:
                last_error = exc
                if writable:
                    break
            except IndexCorruptError:
                if not writable and self._manifest_changed():
                    continue          # a writer committed while we read: read again
                self.close()
                raise
            except BaseException:
                self.close()
                raise
        self.close()
        raise IndexCorruptError(f"{path}: a file the manifest names is missing "
                                f"({last_error})")

    def _manifest_changed(self) -> bool:
        try:
            current = json.loads((self.path / MANIFEST).read_text("utf-8"))
        except (OSError, ValueError):
            return True
        return current.get("generation") != getattr(self, "manifest", {}).get("generation")

    def _acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise IndexLockedError(
                    f"{self.path}: open for writing by another process (e.g. `nearfar serve`); "
                    f"stop it or make the change through it") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the write lock (the index stays consistent on disk at all times)."""
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)   # closing the descriptor releases the flock
                self._lock_fd = None

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ loading
    def _load(self, verify_files: bool) -> None:
        faiss = _faiss()
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text("utf-8"))
        except ValueError as exc:
            raise IndexCorruptError(f"{self.path / MANIFEST}: not valid JSON ({exc})") from None
        if self.manifest.get("format") != FORMAT:
            raise IndexCorruptError(f"{self.path / MANIFEST}: format "
                                    f"{self.manifest.get('format')!r}, expected {FORMAT!r}")
        files = self.manifest["files"]
        for name, rec in files.items():
            p = self.path / name
            if not p.exists():
                raise FileNotFoundError(str(p))
            if p.stat().st_size != rec["bytes"] or (verify_files and
                                                    sha256_file(p) != rec["sha256"]):
                raise IndexCorruptError(f"{p}: does not match the manifest (size or sha256); "
                                        f"the file was truncated or changed")
        gen = self.manifest["generation"]
        data = (self.path / self._faiss_name(gen)).read_bytes()
        self._faiss = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        del data
        self._apply_runtime_params()
        self._items, self._by_key, self._adhash = {}, {}, 0
        for _, raw in read_lines(self.path / self._items_name(gen)):
            if raw.strip():
                text = raw.decode("utf-8")
                self._insert(Item.from_json(json.loads(text), text))
        expected_hash = self.manifest["index_hash"]
        self._log = AuditLog(self.path / LOG)
        self._last_entry = dict(self.manifest["last_log_entry"])
        pending = [self._last_entry]
        # replay the write-ahead log
        applied_seq = int(self._last_entry["seq"])
        lines = read_lines(self.path / WAL)
        wal_size = (self.path / WAL).stat().st_size if lines else 0
        stale = 0
        self._wal_records = 0
        for i, (offset, raw) in enumerate(lines):
            record = self._parse_wal(raw)
            if record is None:
                if offset + len(raw) == wal_size:   # no newline: torn mid-write, never acked
                    if self.writable:
                        truncate_to(self.path / WAL, offset)
                    break
                raise IndexCorruptError(f"{self.path / WAL}: record {i + 1} is complete but does "
                                        f"not match its checksum (changed on disk)")
            seq = int(record["seq"])
            if seq <= applied_seq:
                stale += 1
                continue
            if seq != applied_seq + 1:
                raise IndexCorruptError(f"{self.path / WAL}: record seq {seq} follows "
                                        f"{applied_seq}")
            self._apply_add([Item.from_json(d) for d in record["items"]],
                            np.stack([np.frombuffer(base64.b64decode(d["vector"]), "<f4")
                                      for d in record["items"]]))
            applied_seq = seq
            expected_hash = record["entry"]["index_hash_after"]
            self._last_entry = record["entry"]
            pending.append(record["entry"])
            self._wal_records += 1
        ntotal = int(self._faiss.ntotal)
        if self.kind == "hnsw":
            keys = faiss.vector_to_array(self._faiss.id_map)
            self._tombstones = set(int(k) for k in keys) - set(self._by_key)
        if ntotal != len(self._by_key) + len(self._tombstones):
            raise IndexCorruptError(f"{self.path}: the FAISS index holds {ntotal} vectors but "
                                    f"the item list {len(self._by_key)}")
        if self._log.head_seq > applied_seq:
            raise IndexCorruptError(
                f"{self.path}: the audit log records changes up to entry {self._log.head_seq} but "
                f"the index holds them only up to {applied_seq}: the write-ahead log "
                f"({WAL}) was removed or cut; restore it from a backup")
        if self.index_hash != expected_hash:
            raise IndexCorruptError(f"{self.path}: the items do not add up to the recorded "
                                    f"index hash; a file was changed")
        self.manifest["next_key"] = max([self.manifest["next_key"]] +
                                        [k + 1 for k in self._by_key])
        if self.writable:
            self._repair(pending, stale, len(lines))

    def _repair(self, pending: list[dict[str, Any]], stale: int, wal_lines: int) -> None:
        """After a crash: append committed-but-unlogged entries, drop leftovers."""
        log = self._log
        if log.torn_tail is not None:
            if any(e["seq"] == log.head_seq + 1 for e in pending):
                truncate_to(log.path, log.torn_tail[0])
                log.torn_tail = None
            else:
                raise IndexCorruptError(f"{log.path}: the last line is damaged and the index "
                                        f"holds no copy of it; run `nearfar index verify-log`")
        for entry in sorted(pending, key=lambda e: e["seq"]):
            if entry["seq"] == log.head_seq + 1 and entry["prev"] == log.head_hash:
                log.append(entry)
        if stale and stale == wal_lines:
            os.unlink(self.path / WAL)
        keep = set(self.manifest["files"]) | {MANIFEST, WAL, LOG, LOCK}
        for p in self.path.iterdir():
            stale_snapshot = p.name.startswith(("index-", "items-")) and p.name not in keep
            if stale_snapshot or TMP_MARK in p.name:
                p.unlink(missing_ok=True)
        fsync_dir(self.path)

    @staticmethod
    def _parse_wal(raw: bytes) -> dict[str, Any] | None:
        try:
            obj = json.loads(raw)
            record = obj["record"]
            if sha256_bytes(canonical_json(record).encode("utf-8")) != obj["sha256"]:
                return None
            return record
        except (ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def encoder_sha256(self) -> str:
        return self.manifest["encoder"]["weights_sha256"]

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"]["value"])

    @property
    def threshold_source(self) -> str:
        return str(self.manifest["threshold"]["source"])

    @property
    def subject_field(self) -> str:
        return self.manifest.get("subject_field", "subject")

    @property
    def index_hash(self) -> str:
        return state_hash(self.encoder_sha256, self._adhash)

    @property
    def salt(self) -> bytes:
        return bytes.fromhex(self.manifest["salt"])

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._items

    def ids(self) -> list[str]:
        with self._lock:
            return [it.id for it in sorted(self._by_key.values(), key=lambda it: it.key)]

    def get(self, item_id: str) -> dict[str, Any]:
        with self._lock:
            it = self._items.get(str(item_id))
            if it is None:
                raise UnknownIdError(f"id {item_id!r}: no such item in {self.path}")
            return {"id": it.id, "meta": dict(it.meta)}

    def hash_id(self, item_id: str) -> str:
        return salted_sha256(self.salt, "id", str(item_id).encode("utf-8"))

    def hash_subject(self, subject: str) -> str:
        return salted_sha256(self.salt, "subject", str(subject).encode("utf-8"))

    def hash_content(self, image: np.ndarray) -> str:
        """Salted sha256 of a uint8 (C, H, W) image (:func:`content_bytes`)."""
        return salted_sha256(self.salt, "content", content_bytes(image))

    # ------------------------------------------------------------------ in-memory state
    def _faiss_name(self, gen: int) -> str:
        return f"index-{gen:06d}.faiss"

    def _items_name(self, gen: int) -> str:
        return f"items-{gen:06d}.jsonl"

    def _apply_runtime_params(self) -> None:
        faiss = _faiss()
        p = self.manifest["params"]
        if self.kind == "hnsw":
            faiss.downcast_index(self._faiss.index).hnsw.efSearch = int(p["ef_search"])
        elif self.kind == "ivf":
            self._faiss.nprobe = int(p["nprobe"])

    def _insert(self, it: Item) -> None:
        self._items[it.id] = it
        self._by_key[it.key] = it
        self._adhash = (self._adhash + int(it.h, 16)) % _MOD
        for field, table in self._fields.items():
            if field in it.meta:
                table.setdefault(value_key(it.meta[field]), set()).add(it.key)

    def _remove(self, it: Item) -> None:
        del self._items[it.id]
        del self._by_key[it.key]
        self._adhash = (self._adhash - int(it.h, 16)) % _MOD
        for field, table in self._fields.items():
            if field in it.meta:
                keys = table.get(value_key(it.meta[field]))
                if keys is not None:
                    keys.discard(it.key)

    def _apply_add(self, items: list[Item], vectors: np.ndarray) -> None:
        keys = np.array([it.key for it in items], dtype=np.int64)
        self._faiss.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keys)
        for it in items:
            self._insert(it)
        self.manifest["next_key"] = max(self.manifest["next_key"], int(keys.max()) + 1)

    def _clear_cache(self) -> int:
        n = len(self._cache)
        self._cache.clear()
        self._selectors.clear()
        return n

    def set_search_params(self, **params: Any) -> None:
        """Change ``nprobe`` (ivf) or ``ef_search`` (hnsw) for this process; to keep a
        value, give it when building the index."""
        allowed = {"ivf": {"nprobe"}, "hnsw": {"ef_search"}}.get(self.kind, set())
        for name, value in params.items():
            if name not in allowed:
                raise IndexStoreError(f"{name}: not a search parameter of a {self.kind} index "
                                      f"(those are: {', '.join(sorted(allowed)) or 'none'})")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IndexStoreError(f"{name}: expected a positive integer, got {value!r}")
        with self._lock:
            self.manifest["params"].update(params)
            self._apply_runtime_params()
            self._cache.clear()

    def _field_table(self, field: str) -> dict[str, set[int]]:
        table = self._fields.get(field)
        if table is None:
            table = {}
            for it in self._by_key.values():
                if field in it.meta:
                    table.setdefault(value_key(it.meta[field]), set()).add(it.key)
            self._fields[field] = table
        return table

    # ------------------------------------------------------------------ persistence
    def _write_snapshot(self, entry: dict[str, Any] | None) -> None:
        """New generation of files + manifest; then the log entry; then remove leftovers."""
        faiss = _faiss()
        gen = int(self.manifest["generation"]) + 1
        files = {k: v for k, v in self.manifest["files"].items() if k == TRAINING_RECORD}
        blob = faiss.serialize_index(self._faiss)
        files[self._faiss_name(gen)] = atomic_write(self.path / self._faiss_name(gen), blob,
                                                    sync_dir=False)
        del blob
        lines = [it.serialised() for it in sorted(self._by_key.values(), key=lambda it: it.key)]
        files[self._items_name(gen)] = atomic_write(
            self.path / self._items_name(gen), ("\n".join(lines) + "\n").encode("utf-8")
            if lines else b"", sync_dir=False)
        if entry is not None:
            self._last_entry = entry
        manifest = dict(self.manifest)
        manifest.update(generation=gen, files=files, count=len(self._items),
                        index_hash=self.index_hash, last_log_entry=self._last_entry,
                        written=utc_now())
        atomic_write_json(self.path / MANIFEST, manifest)   # the commit point
        self.manifest = manifest
        if entry is not None and entry["seq"] == self._log.head_seq + 1:
            self._log.append(entry)
        (self.path / WAL).unlink(missing_ok=True)
        self._wal_records = 0
        keep = set(files) | {MANIFEST, LOG, LOCK}
        for p in self.path.iterdir():
            if p.name not in keep and (p.name.startswith(("index-", "items-"))
                                       or TMP_MARK in p.name):
                p.unlink(missing_ok=True)
        fsync_dir(self.path)

    def _reload(self) -> None:
        """Back to what is on disk after a failed change (memory may be half-applied)."""
        self._cache.clear()
        self._selectors = {}
        self._fields = {}
        self._tombstones = set()
        self._load(verify_files=False)

    def _require_writable(self) -> None:
        if not self.writable:
            raise IndexStoreError(f"{self.path}: opened read-only; open it writable to change it")

    def check_encoder(self, encoder_sha256: str | None, what: str) -> None:
        """Raise :class:`EncoderMismatchError` unless ``encoder_sha256`` is the bound one."""
        if encoder_sha256 != self.encoder_sha256:
            given = "no encoder version" if not encoder_sha256 else \
                f"encoder {str(encoder_sha256)[:12]}..."
            raise EncoderMismatchError(
                f"encoder version mismatch: this index holds embeddings of encoder "
                f"{self.encoder_sha256[:12]}... (weights sha256) but the {what} comes from "
                f"{given}; embeddings of different encoder versions are not comparable. "
                f"Use that encoder's run, or rebuild the index for the new encoder with "
                f"`nearfar index build`")

    # ------------------------------------------------------------------ changes
    def add(self, ids: Sequence[Any], vectors: Any, metas: Sequence[Any] | None = None, *,
            encoder_sha256: str, actor: str, contents: Sequence[str | None] | None = None,
            sources: Sequence[str | None] | None = None, action: str = "add",
            details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Add items; durable (fsynced) when this returns.

        Args:
            ids: unique item ids (converted with ``str``); none may already be indexed.
            vectors: (N, dim) embeddings from the bound encoder (L2-normalised here).
            metas: one metadata dict per item (plain JSON), or None.
            encoder_sha256: the weights sha256 of the encoder that made ``vectors``.
            actor: who is adding (recorded in the audit log).
            contents: salted content hashes (:meth:`hash_content`) per item, or None.
            sources: sha256 of the dataset each item came from, or None.
        Returns:
            ``{"added", "log_seq", "index_hash"}``.
        """
        self._require_writable()
        self.check_encoder(encoder_sha256, "vectors to add")
        ids = [self._check_id(x) for x in ids]
        n = len(ids)
        if n == 0:
            raise IndexStoreError("ids: expected at least one item to add, got none")
        vecs = as_matrix(vectors, self.dim, "vectors")
        if len(vecs) != n:
            raise IndexStoreError(f"vectors: expected {n} rows (one per id), got {len(vecs)}")
        metas = [None] * n if metas is None else list(metas)
        if len(metas) != n:
            raise IndexStoreError(f"metas: expected {n} (one per id), got {len(metas)}")
        metas = [_plain_meta(m, f"metas[{i}]") for i, m in enumerate(metas)]
        contents = [None] * n if contents is None else list(contents)
        sources = [None] * n if sources is None else list(sources)
        if len(set(ids)) != n:
            dup = next(x for x in ids if ids.count(x) > 1)
            raise DuplicateIdError(f"ids: {dup!r} appears more than once in this batch")
        with self._lock:
            present = [x for x in ids if x in self._items]
            if present:
                raise DuplicateIdError(
                    f"ids: {len(present)} already indexed (first: {present[0]!r}); delete "
                    f"them first to replace them")
            k0 = int(self.manifest["next_key"])
            items = [Item(k0 + i, ids[i], metas[i], item_hash(ids[i], metas[i], vecs[i]),
                          contents[i], sources[i]) for i in range(n)]
            before = self.index_hash
            adhash = (self._adhash + sum(int(it.h, 16) for it in items)) % _MOD
            entry = self._log.make_entry(
                action=action, actor=actor, ids_sha256=[self.hash_id(x) for x in ids],
                index_hash_before=before,
                index_hash_after=state_hash(self.encoder_sha256, adhash),
                encoder_sha256=self.encoder_sha256, details=dict(details or {}))
            if n >= BULK_ADD:
                try:
                    self._apply_add(items, vecs)
                    self._write_snapshot(entry)
                except BaseException:
                    self._reload()
                    raise
            else:
                record = {"seq": entry["seq"], "entry": entry, "items": [
                    {**it.to_json(), "vector": base64.b64encode(vecs[i].tobytes()).decode()}
                    for i, it in enumerate(items)]}
                line = canonical_json({"record": record, "sha256": sha256_bytes(
                    canonical_json(record).encode("utf-8"))})
                append_line(self.path / WAL, line)          # durable from here on
                self._apply_add(items, vecs)
                self._wal_records += 1
                self._last_entry = entry
                self._log.append(entry)
                if (self.path / WAL).stat().st_size > WAL_COMPACT_BYTES:
                    self._write_snapshot(None)
            self._clear_cache()
            return {"added": n, "log_seq": entry["seq"], "index_hash": entry["index_hash_after"]}

    def _check_id(self, item_id: Any) -> str:
        if isinstance(item_id, (bytes, bytearray)) or item_id is None:
            raise IndexStoreError(f"id: expected a string or integer, got {item_id!r}")
        s = str(item_id)
        if not s or len(s) > MAX_ID_CHARS:
            raise IndexStoreError(f"id: expected 1 to {MAX_ID_CHARS} characters, got {len(s)}")
        return s

    def keys_of_subject(self, subject: str) -> list[int]:
        field, s = self.subject_field, str(subject)
        return [it.key for it in self._by_key.values()
                if field in it.meta and str(it.meta[field]) == s]

    def delete(self, ids: Iterable[Any] = (), *, subjects: Iterable[Any] = (),
               actor: str) -> dict[str, Any]:
        """Erase items by id and/or by subject, rewriting the saved index without them.

        Returns ``{"deleted": [ids], "not_found": [ids], "subjects": {subject: n},
        "log_seq", "index_hash_before", "index_hash_after", "cache_entries_dropped",
        "removed": [Item]}`` (``removed`` for the caller's membership report).
        Raises :class:`UnknownIdError` when nothing matches.
        """
        self._require_writable()
        ids = [self._check_id(x) for x in ids]
        subjects = [str(s) for s in subjects]
        with self._lock:
            keys: dict[int, None] = {}
            not_found = []
            for x in ids:
                it = self._items.get(x)
                if it is None:
                    not_found.append(x)
                else:
                    keys[it.key] = None
            per_subject = {}
            for s in subjects:
                found = self.keys_of_subject(s)
                per_subject[s] = len(found)
                keys.update(dict.fromkeys(found))
            if not keys:
                what = [f"id {x!r}" for x in ids] + [f"subject {s!r}" for s in subjects]
                raise UnknownIdError(f"nothing to delete: no item with {', '.join(what)} in "
                                     f"{self.path}")
            removed = [self._by_key[k] for k in keys]
            before = self.index_hash
            adhash = (self._adhash - sum(int(it.h, 16) for it in removed)) % _MOD
            details: dict[str, Any] = {"kind": self.kind}
            if subjects:
                details["subjects_sha256"] = [self.hash_subject(s) for s in subjects]
                details["subject_field"] = self.subject_field
            if not_found:
                details["not_found"] = len(not_found)
            entry = self._log.make_entry(
                action="delete", actor=actor, ids_sha256=[self.hash_id(it.id) for it in removed],
                index_hash_before=before,
                index_hash_after=state_hash(self.encoder_sha256, adhash),
                encoder_sha256=self.encoder_sha256, details=details)
            try:
                self._remove_vectors(np.fromiter(keys, dtype=np.int64, count=len(keys)))
                for it in removed:
                    self._remove(it)
                dropped = self._clear_cache()
                self._write_snapshot(entry)
            except BaseException:
                self._reload()
                raise
            return {"deleted": [it.id for it in removed], "not_found": not_found,
                    "subjects": per_subject, "log_seq": entry["seq"],
                    "index_hash_before": before, "index_hash_after": entry["index_hash_after"],
                    "cache_entries_dropped": dropped, "removed": removed,
                    "files": sorted(self.manifest["files"])}

    def _remove_vectors(self, keys: np.ndarray) -> None:
        faiss = _faiss()
        if self.kind != "hnsw":
            removed = self._faiss.remove_ids(keys)
            if removed != len(keys):
                raise IndexCorruptError(f"FAISS removed {removed} of {len(keys)} vectors")
            return
        # HNSW cannot unlink a node: overwrite its stored vector, exclude it from search
        inner = faiss.downcast_index(self._faiss.index)
        storage = faiss.downcast_index(inner.storage)
        codes = faiss.rev_swig_ptr(storage.codes.data(), storage.codes.size())
        slots = faiss.vector_to_array(self._faiss.id_map)
        row = self.dim * 4
        for pos in np.flatnonzero(np.isin(slots, keys)):
            codes[pos * row:(pos + 1) * row] = 0
        self._tombstones.update(int(k) for k in keys)
        fraction = float(self.manifest["params"].get("rebuild_fraction", 0.1))
        if len(self._tombstones) > fraction * max(int(self._faiss.ntotal), 1):
            self._rebuild_hnsw(slots, codes)

    def _rebuild_hnsw(self, slots: np.ndarray, codes: np.ndarray) -> None:
        vectors = codes.view(np.float32).reshape(-1, self.dim)
        live = ~np.isin(slots, np.fromiter(self._tombstones, dtype=np.int64))
        index = _new_faiss_index("hnsw", self.dim, self.manifest["params"], None)
        if live.any():
            index.add_with_ids(np.ascontiguousarray(vectors[live]), slots[live])
        self._faiss = index
        self._apply_runtime_params()
        self._tombstones = set()

    def compact(self) -> None:
        """Fold the write-ahead log into a new snapshot (and rebuild HNSW without tombstones)."""
        self._require_writable()
        faiss = _faiss()
        with self._lock:
            if self.kind == "hnsw" and self._tombstones:
                storage = faiss.downcast_index(faiss.downcast_index(self._faiss.index).storage)
                self._rebuild_hnsw(faiss.vector_to_array(self._faiss.id_map),
                                   faiss.vector_to_array(storage.codes))
            self._write_snapshot(None)

    # ------------------------------------------------------------------ queries
    def vectors_of(self, ids: Sequence[Any]) -> np.ndarray:
        """The stored (normalised) vectors of ``ids``, (N, dim)."""
        with self._lock:
            keys = []
            for x in ids:
                it = self._items.get(str(x))
                if it is None:
                    raise UnknownIdError(f"id {x!r}: no such item in {self.path}")
                keys.append(it.key)
            return self._vectors_of_keys(keys)

    def _vectors_of_keys(self, keys: Sequence[int]) -> np.ndarray:
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = self._faiss.reconstruct(int(k))
        return out

    def _allowed(self, where: Mapping[str, Any]) -> set[int] | None:
        if not where:
            return None
        allowed: set[int] | None = None
        for field, value in where.items():
            keys = self._field_table(field).get(value_key(value), set())
            allowed = set(keys) if allowed is None else allowed & keys
            if not allowed:
                return set()
        return allowed

    def _search_params(self, k: int, sel: Any):
        faiss = _faiss()
        p = self.manifest["params"]
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=max(int(p["ef_search"]), k))
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=int(p["nprobe"]))
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _filter(self, where: Mapping[str, Any]) -> tuple[set[int] | None, Any]:
        """The keys a filter allows and a FAISS selector for them (cached until a change)."""
        if not where:
            return None, None
        wkey = canonical_json(where)
        hit = self._selectors.get(wkey)
        if hit is None:
            allowed = self._allowed(where)
            keys = np.fromiter(allowed, dtype=np.int64, count=len(allowed))
            if len(keys) > EXACT_FILTER_MAX:
                hit = (allowed, _faiss().IDSelectorBatch(keys))
            else:     # few enough to score exactly: keep their vectors
                hit = (allowed, (keys, self._vectors_of_keys(keys)))
            self._selectors[wkey] = hit
            while len(self._selectors) > 16:
                self._selectors.pop(next(iter(self._selectors)))
        return hit

    def _search_keys(self, q: np.ndarray, k: int, allowed: set[int] | None,
                     sel: Any = None) -> list[list[tuple[int, float]]]:
        faiss = _faiss()
        if allowed is not None and len(allowed) <= EXACT_FILTER_MAX:
            if not allowed:
                return [[] for _ in range(len(q))]
            keys, vectors = sel
            scores = q @ vectors.T
            kk = min(k, len(keys))
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            out = []
            for r in range(len(q)):
                order = top[r][np.argsort(-scores[r, top[r]], kind="stable")]
                out.append([(int(keys[j]), float(scores[r, j])) for j in order])
            return out
        if allowed is None and self._tombstones:
            batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64,
                                                      count=len(self._tombstones)))
            sel = faiss.IDSelectorNot(batch)
            sel.referenced_batch = batch   # keep it alive while sel is used
        params = self._search_params(k, sel)
        if self.search_threads is not None:
            faiss.omp_set_num_threads(int(self.search_threads))
        scores, labels = self._faiss.search(q, k, params=params)
        out = []
        for r in range(len(q)):
            out.append([(int(key), float(s)) for key, s in zip(labels[r], scores[r])
                        if key >= 0 and int(key) in self._by_key])
        return out

    def search(self, queries: Any, k: int = 10, *, encoder_sha256: str,
               where: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``k`` nearest items to each query, with scores and review flags.

        Args:
            queries: (N, dim) embeddings from the bound encoder (normalised here).
            k: results per query, 1..10,000.
            encoder_sha256: the weights sha256 of the encoder that made ``queries``.
            where: equality filter on metadata, e.g. ``{"group": "a"}``.

        Returns:
            ``{"encoder_sha256", "threshold", "threshold_source", "k", "where",
            "results": [[{"id", "score", "needs_review", "meta"}, ...] per query]}``;
            ``needs_review`` is true when the score is under the threshold.
        """
        self.check_encoder(encoder_sha256, "query")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise IndexStoreError(f"k: expected an integer in 1..{MAX_K}, got {k!r}")
        where = normalise_where(where)
        q = as_matrix(queries, self.dim, "queries")
        wkey = canonical_json(where)
        threshold = self.threshold
        with self._lock:
            rows: list[list[tuple[int, float]] | None] = []
            missing = []
            for r in range(len(q)):
                hit = self._cache.get((q[r].tobytes(), k, wkey))
                if hit is not None:
                    self._cache.move_to_end((q[r].tobytes(), k, wkey))
                else:
                    missing.append(r)
                rows.append(hit)
            if missing:
                found = self._search_keys(q[missing], k, *self._filter(where))
                for r, res in zip(missing, found):
                    rows[r] = res
                    self._cache[(q[r].tobytes(), k, wkey)] = res
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            results = [[{"id": self._by_key[key].id, "score": score,
                         "needs_review": bool(score < threshold),
                         "meta": dict(self._by_key[key].meta)}
                        for key, score in row if key in self._by_key] for row in rows]
        return {"encoder_sha256": self.encoder_sha256, "threshold": threshold,
                "threshold_source": self.threshold_source, "k": k, "where": where,
                "results": results}

    # ------------------------------------------------------------------ records
    def training_record(self) -> dict[str, Any] | None:
        """The stored record of the encoder's training items (see ``membership``)."""
        if self._training is None and TRAINING_RECORD in self.manifest["files"]:
            self._training = json.loads((self.path / TRAINING_RECORD).read_text("utf-8"))
        return self._training

    def info(self) -> dict[str, Any]:
        with self._lock:
            rec = self.training_record() or {}
            return {
                "path": str(self.path),
                "format": FORMAT,
                "kind": self.kind,
                "params": dict(self.manifest["params"]),
                "dim": self.dim,
                "count": len(self._items),
                "encoder": dict(self.manifest["encoder"]),
                "threshold": dict(self.manifest["threshold"]),
                "subject_field": self.subject_field,
                "index_hash": self.index_hash,
                "generation": self.manifest["generation"],
                "wal_records": self._wal_records,
                "hnsw_tombstones": len(self._tombstones),
                "log": {"head_seq": self._log.head_seq, "head_hash": self._log.head_hash},
                "training_record": {"status": rec.get("status", "none"),
                                    "basis": rec.get("basis", "no training record stored")},
                "created": self.manifest["created"],
            }

    def verify(self, *, deep: bool = False) -> dict[str, Any]:
        """Check the audit log (chain, anchors, final hash) and, with ``deep``, recompute
        every item hash from the stored vectors. ``{"ok", "log": {...}, "problems"}``."""
        with self._lock:
            anchors = [self.manifest.get("last_log_entry", {}), self._last_entry]
            for _, raw in read_lines(self.path / WAL):
                record = self._parse_wal(raw)
                if record is not None:
                    anchors.append(record["entry"])
            report = verify_log(self.path / LOG, anchors, final_index_hash=self.index_hash)
            problems = list(report.problems)
            if deep:
                bad = 0
                for it in self._by_key.values():
                    vec = self._faiss.reconstruct(it.key)
                    if item_hash(it.id, it.meta, vec) != it.h:
                        bad += 1
                if bad:
                    problems.append(f"{bad} item(s) do not match their recorded hash")
            return {"ok": not problems, "log": report.to_dict(), "problems": problems}
