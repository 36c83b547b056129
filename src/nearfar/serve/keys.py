"""API keys for the service: stored hashed, each with a role.

A key looks like ``nfk_<key id>_<secret>``; it is shown once, when created. The keys
file keeps, per key, its id, name, role, a random salt and ``sha256(salt || secret)``
(the secret is 256 random bits, so a fast hash suffices: there is nothing to guess),
never the secret. Roles are ordered: ``reader`` (embed, search, card) < ``writer``
(+ add and delete items) < ``admin`` (+ delete by subject, verify the log). The file is
re-read when it changes, so a revocation takes effect without a restart.

    nearfar serve keys add --keys keys.json --role writer --name ingest
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = "nearfar-keys/1"
ROLES = ("reader", "writer", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}
PREFIX = "nfk"


class KeyFileError(ValueError):
    """The keys file is missing, unreadable, or a key request is invalid."""


@dataclass
class KeyRecord:
    key_id: str
    name: str
    role: str
    salt: str
    sha256: str
    created: str
    revoked: bool = False

    def public(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "name": self.name, "role": self.role,
                "created": self.created, "revoked": self.revoked}


def hash_secret(salt_hex: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt_hex) + secret.encode("utf-8")).hexdigest()


def check_role(role: str) -> str:
    if role not in RANK:
        raise KeyFileError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    return role


class KeyStore:
    """The keys file: add, revoke, list, and check a presented key."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._keys: dict[str, KeyRecord] = {}
        if not self.path.exists():
            if not create:
                raise KeyFileError(f"{self.path}: no keys file; create a key with `nearfar serve "
                                   f"keys add --keys {self.path} --role admin`")
            return
        self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text("utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            keys = {k["key_id"]: KeyRecord(**k) for k in data["keys"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"{self.path}: not a readable keys file ({exc})") from None
        self._keys = keys
        self._mtime = self.path.stat().st_mtime_ns

    def _maybe_reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._keys = {}
            return
        if mtime != self._mtime:
            self._read()

    def _write(self) -> None:
        data = {"format": FORMAT, "keys": [asdict(k) for k in self._keys.values()]}
        text = json.dumps(data, indent=1) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._mtime = self.path.stat().st_mtime_ns

    def add(self, role: str, name: str = "") -> tuple[str, KeyRecord]:
        """Create a key; returns ``(the key, its record)``. The key is not stored."""
        check_role(role)
        with self._lock:
            if self.path.exists():
                self._read()
            key_id = secrets.token_hex(4)
            while key_id in self._keys:  # pragma: no cover - 1 in 4 billion
                key_id = secrets.token_hex(4)
            secret = secrets.token_urlsafe(32)
            salt = secrets.token_hex(16)
            record = KeyRecord(key_id=key_id, name=name or f"{role}-{key_id}", role=role,
                               salt=salt, sha256=hash_secret(salt, secret),
                               created=_dt.datetime.now(_dt.timezone.utc).isoformat(
                                   timespec="seconds"))
            self._keys[key_id] = record
            self._write()
        return f"{PREFIX}_{key_id}_{secret}", record

    def revoke(self, key_id: str) -> KeyRecord:
        with self._lock:
            self._read()
            record = self._keys.get(key_id)
            if record is None:
                raise KeyFileError(f"key id {key_id!r}: not in {self.path}")
            record.revoked = True
            self._write()
            return record

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            self._maybe_reload()
            return [k.public() for k in self._keys.values()]

    def authenticate(self, token: str | None) -> KeyRecord | None:
        """The record of a valid, unrevoked key, else None (constant-time comparison)."""
        if not token or not isinstance(token, str):
            return None
        parts = token.strip().split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            return None
        with self._lock:
            self._maybe_reload()
            record = self._keys.get(parts[1])
        if record is None or record.revoked:
            hmac.compare_digest("0" * 64, hash_secret("00" * 16, parts[2]))  # same work
            return None
        if not hmac.compare_digest(record.sha256, hash_secret(record.salt, parts[2])):
            return None
        return record
