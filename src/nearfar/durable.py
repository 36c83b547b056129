"""Durable files, shared by checkpoints, cards and indexes: temp file + fsync +
``os.replace``; fsynced appends; content hashes.

A reader never sees a half-written file: each is written under a temporary
name in the same directory, flushed to disk, and renamed into place; the directory is
fsynced after the rename so the new name itself survives a power cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def canonical_json(value: Any) -> str:
    """One deterministic JSON text per value (sorted keys, no spaces, no NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (weights files can be large)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: expected a file to hash, found none")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | memoryview, *,
                 sync_dir: bool = True) -> dict[str, Any]:
    """Write ``data`` to ``path`` atomically; returns ``{"bytes", "sha256"}`` of the data."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return {"bytes": len(data), "sha256": sha256_bytes(data)}


def write_synced(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``path`` (not atomically) and fsync it: for files inside a directory that is
    itself renamed into place afterwards."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, value: Any) -> dict[str, Any]:
    text = json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return atomic_write(path, (text + "\n").encode("utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync before returning (the line is durable when this returns)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def truncate_to(path: str | os.PathLike, size: int) -> None:
    """Cut a file back to ``size`` bytes (dropping a torn last line) and fsync it."""
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: str | os.PathLike) -> list[tuple[int, bytes]]:
    """Lines of a file as ``(start offset, raw bytes without the newline)``; a last line
    without its newline is returned too (the caller decides whether it is torn)."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    out, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            out.append((start, data[start:]))
            break
        out.append((start, data[start:end]))
        start = end + 1
    return out
