"""Equality filters on item metadata: ``group == "a"``, ``label == 3``.

A filter is a dict ``{field: value}``; an item matches when every field equals the
value (JSON types count: ``3`` and ``"3"`` differ; CSV manifests give strings). On the
command line each ``--where`` takes ``FIELD == VALUE`` where VALUE is a JSON literal
(``"a"``, ``3``, ``true``, ``null``) or a bare word taken as a string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from nearfar.durable import canonical_json

_SCALARS = (str, int, float, bool, type(None))


def normalise_where(where: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated copy of a filter dict; raises ValueError naming the bad part."""
    if where is None:
        return {}
    if not isinstance(where, Mapping):
        raise ValueError(f"where: expected an object like {{\"group\": \"a\"}}, got "
                         f"{type(where).__name__}")
    out = {}
    for field, value in where.items():
        if not isinstance(field, str) or not field:
            raise ValueError(f"where: expected non-empty field names, got {field!r}")
        if not isinstance(value, _SCALARS):
            raise ValueError(f"where.{field}: expected a string, number, boolean or null to "
                             f"compare for equality, got {type(value).__name__}")
        out[field] = value
    return out


def parse_where(expressions: Iterable[str]) -> dict[str, Any]:
    """``["group == \\"a\\"", "label == 3"]`` -> ``{"group": "a", "label": 3}``."""
    out: dict[str, Any] = {}
    for text in expressions:
        if "==" in text:
            field, _, raw = text.partition("==")
        elif "=" in text:
            field, _, raw = text.partition("=")
        else:
            raise ValueError(f"--where: expected FIELD == VALUE (e.g. group == \"a\"), got "
                             f"{text!r}")
        field, raw = field.strip(), raw.strip()
        if not field or not raw:
            raise ValueError(f"--where: expected FIELD == VALUE (e.g. group == \"a\"), got "
                             f"{text!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if not isinstance(value, _SCALARS):
            raise ValueError(f"--where {field}: expected a single value, got {raw!r}")
        out[field] = value
    return normalise_where(out)


def value_key(value: Any) -> str:
    """The form a metadata value is compared in (type-aware: 3 != "3")."""
    return canonical_json(value)
