"""The card: the record that travels with every encoder.

A card is plain data (a JSON object) with one section per question a user of the
encoder will ask: what was optimised (``objective``), what counted as near
(``positive_construction``) and as far (``negative_construction``), on what
``modality``, which ``encoder`` (with the sha256 of its weights file), which
``dataset`` (name, version, source, sha256, split sizes), how it was evaluated
(``evaluation``: each result with the protocol that produced it), the ``seed``, the
``software`` versions and when it was ``created``.

Each run directory holds ``card.json`` and a rendered ``card.md``::

    card = build_card(method=method.describe(), dataset=ds.describe() | {"splits": ...},
                      encoder=encoder_section(architecture="resnet18",
                                              weights_path=run / "weights.safetensors",
                                              module=encoder, embedding_dim=512),
                      evaluation={"protocol": "frozen encoder, head dropped",
                                  "results": [knn_acc, probe]},
                      seed=0)
    write_card(run, card)
    missing_fields(read_card(run))   # [] when every source-discipline field is stated

Nothing here imports torch: a card can be read and checked anywhere.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from nearfar.durable import atomic_write, sha256_file

CARD_VERSION = 1
CARD_JSON = "card.json"
CARD_MD = "card.md"

#: the sections of a card, in the order they are written and rendered
SECTIONS = (
    "objective",
    "positive_construction",
    "negative_construction",
    "modality",
    "encoder",
    "dataset",
    "evaluation",
    "seed",
    "software",
    "created",
)

_TITLES = {
    "objective": "Objective",
    "positive_construction": "Positive construction (what counts as near)",
    "negative_construction": "Negative construction (what counts as far)",
    "modality": "Modality",
    "encoder": "Encoder",
    "dataset": "Dataset",
    "evaluation": "Evaluation",
    "seed": "Seed",
    "software": "Software",
    "created": "Created",
    "uses": "Uses",
}

#: the source-discipline fields a complete card states; dotted paths. A field is
#: missing when absent, None or an empty string; those marked in _NON_EMPTY must
#: also not be an empty list / dict. State a field that does not apply (e.g. the
#: temperature of a non-contrastive loss) as the string "n/a" rather than leaving it out.
REQUIRED_FIELDS = (
    "objective.loss",
    "objective.temperature",
    "objective.head_downstream",
    "positive_construction.construction",
    "positive_construction.views",
    "negative_construction.source",
    "negative_construction.batch_size",
    "negative_construction.exclusions",
    "modality",
    "encoder.architecture",
    "encoder.parameter_count",
    "encoder.embedding_dim",
    "encoder.weights_sha256",
    "dataset.name",
    "dataset.version",
    "dataset.source",
    "dataset.sha256",
    "dataset.splits",
    "evaluation.protocol",
    "evaluation.results",
    "seed",
    "software.python",
    "software.torch",
    "software.numpy",
    "software.nearfar",
    "software.platform",
    "created",
)
_NON_EMPTY = {"positive_construction.views", "dataset.splits", "evaluation.results"}
_RESULT_FIELDS = ("metric", "value", "protocol")


class CardError(ValueError):
    """A card file that is unreadable or not a card."""


class CardNotFoundError(CardError, FileNotFoundError):
    """No card.json where one was expected (both a CardError and a FileNotFoundError)."""


# ------------------------------------------------------------------ hashing and versions

def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    """Versions of python, torch, numpy and nearfar, and the platform string."""
    from nearfar import __version__

    out = {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "nearfar": __version__,
        "platform": platform.platform(),
    }
    torch = sys.modules.get("torch")     # only if already imported: the card never imports it
    if torch is not None:
        out["torch"] = str(torch.__version__)
        cuda = getattr(getattr(torch, "version", None), "cuda", None)
        if cuda:
            out["cuda"] = str(cuda)
    return out


def encoder_section(*, architecture: str, weights_path: str | os.PathLike | None = None,
                    module: Any = None, parameter_count: int | None = None,
                    embedding_dim: int | None = None, **extra: Any) -> dict[str, Any]:
    """The ``encoder`` section: architecture, parameter count, embedding dim, weights hash.

    ``parameter_count`` is taken from ``module.parameters()`` when a module is given;
    ``weights_sha256`` is computed from ``weights_path`` when given.
    """
    if parameter_count is None and module is not None:
        parameter_count = int(sum(p.numel() for p in module.parameters()))
    out: dict[str, Any] = {
        "architecture": architecture,
        "parameter_count": parameter_count,
        "embedding_dim": embedding_dim,
    }
    if weights_path is not None:
        out["weights_file"] = Path(weights_path).name
        out["weights_sha256"] = sha256_file(weights_path)
    else:
        out["weights_sha256"] = None
    out.update(extra)
    return out


# ------------------------------------------------------------------ building

def _plain(value: Any, where: str) -> Any:
    """Value as JSON-ready plain data (dicts with str keys, lists, str, numbers, bool, None)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):                        # e.g. nearfar.evaluate.Result (a float)
        return _plain(to_dict(), where)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value}")
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: expected string keys, got {type(k).__name__} {k!r}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)          # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return _plain(item(), where)
    raise ValueError(
        f"{where}: expected plain data (dict, list, str, number, bool, None), "
        f"got {type(value).__name__}"
    )


def _merge(base: Mapping[str, Any] | None, override: Mapping[str, Any] | None) -> dict | None:
    if base is None and override is None:
        return None
    return {**(base or {}), **(override or {})}


def build_card(*, method: Mapping[str, Any] | None = None,
               objective: Mapping[str, Any] | None = None,
               positive_construction: Mapping[str, Any] | Sequence[Any] | None = None,
               negative_construction: Mapping[str, Any] | None = None,
               modality: str | None = None,
               encoder: Mapping[str, Any] | None = None,
               dataset: Mapping[str, Any] | None = None,
               evaluation: Mapping[str, Any] | Sequence[Any] | None = None,
               seed: int | None = None,
               software: Mapping[str, Any] | None = None,
               created: str | None = None,
               name: str | None = None,
               uses: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble a card as plain data. Nothing is required here: gaps are left as None
    and named by :func:`missing_fields`, so a partial run can still be recorded.

    Args:
        method: a method's ``describe()`` (``objective``, ``positives``, ``negatives``,
            ``modality``, ``encoder``); explicit arguments below override its parts.
        objective: ``loss``, ``temperature``, ``head_downstream`` ("kept"/"dropped"), ...
        positive_construction: ``{"construction": str, "views": [...]}``; a bare list is
            taken as the views pipeline description.
        negative_construction: ``source`` ("in-batch", "queue", ...), ``batch_size``,
            ``exclusions`` (a list; empty means none).
        modality: "image", "text", "image-text", ...
        encoder: see :func:`encoder_section`.
        dataset: ``name``, ``version``, ``source``, ``sha256``, ``splits``
            (e.g. ``{"train": 4000, "test": 1000}``) and anything else.
        evaluation: ``{"protocol": ..., "results": [...]}``; a bare list is taken as the
            results. Each result is ``{"metric", "value", "protocol"}`` or an object
            with ``to_dict()`` (``nearfar.evaluate.Result``).
        seed: the run's seed.
        software: defaults to :func:`software_versions`.
        created: ISO 8601 time; defaults to now (UTC).
        name: a title for the rendered card.
        uses: optional ``{"intended": [...], "out_of_scope": [...]}``.
    """
    method = dict(method or {})
    m_encoder = method.get("encoder") or {}
    encoder_from_method = {
        k2: m_encoder[k1] for k1, k2 in
        (("class", "architecture"), ("parameters", "parameter_count"), ("out_dim", "embedding_dim"))
        if k1 in m_encoder
    } or None

    if isinstance(positive_construction, Sequence) and not isinstance(positive_construction, str):
        positive_construction = {"views": list(positive_construction)}
    if isinstance(evaluation, Sequence) and not isinstance(evaluation, str):
        evaluation = {"results": list(evaluation)}

    card: dict[str, Any] = {"card_version": CARD_VERSION}
    if name is not None:
        card["name"] = name
    card.update({
        "objective": _merge(method.get("objective"), objective),
        "positive_construction": _merge(method.get("positives"), positive_construction),
        "negative_construction": _merge(method.get("negatives"), negative_construction),
        "modality": modality if modality is not None else method.get("modality"),
        "encoder": _merge(encoder_from_method, encoder),
        "dataset": None if dataset is None else dict(dataset),
        "evaluation": None if evaluation is None else dict(evaluation),
        "seed": seed,
        "software": dict(software) if software is not None else software_versions(),
        "created": created if created is not None else
        _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    for key in ("method", "reference"):
        if key in method:
            card.setdefault("method", {})[key] = method[key]
    if uses is not None:
        card["uses"] = dict(uses)
    return _plain(card, "card")


# ------------------------------------------------------------------ checking

def _lookup(card: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = card
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _absent(value: Any, non_empty: bool) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    return non_empty and isinstance(value, (list, dict)) and len(value) == 0


def missing_fields(card: Mapping[str, Any]) -> list[str]:
    """Dotted paths of the required source-discipline fields that the card lacks.

    Besides :data:`REQUIRED_FIELDS`, every evaluation result must state its
    ``metric``, ``value`` and ``protocol`` (``evaluation.results[2].protocol``).
    An empty list means the card is complete.
    """
    if not isinstance(card, Mapping):
        raise ValueError(f"card: expected a dict, got {type(card).__name__}")
    missing = []
    for path in REQUIRED_FIELDS:
        found, value = _lookup(card, path)
        if not found or _absent(value, path in _NON_EMPTY):
            missing.append(path)
    _, results = _lookup(card, "evaluation.results")
    if isinstance(results, list):
        for i, result in enumerate(results):
            for field in _RESULT_FIELDS:
                value = result.get(field) if isinstance(result, Mapping) else None
                if _absent(value, field == "protocol"):
                    missing.append(f"evaluation.results[{i}].{field}")
    return missing


# ------------------------------------------------------------------ files

def write_card(run_dir: str | os.PathLike, card: Mapping[str, Any]) -> Path:
    """Write ``card.json`` and ``card.md`` into ``run_dir`` (created if needed).

    Each file is written to a temporary file in the same directory and moved into
    place with ``os.replace``, so a reader never sees a half-written card.

    Returns:
        The path of ``card.json``.
    """
    run = Path(run_dir)
    if not isinstance(card, Mapping):
        raise ValueError(f"card: expected a dict, got {type(card).__name__}")
    plain = _plain(card, "card")
    text = json.dumps(plain, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    markdown = render_markdown(plain)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write(run / CARD_JSON, text.encode("utf-8"))
    atomic_write(run / CARD_MD, markdown.encode("utf-8"))
    return run / CARD_JSON


def read_card(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a card from a run directory (or a ``card.json`` path).

    Raises:
        CardNotFoundError (a FileNotFoundError) when there is no card; CardError
        (a ValueError) naming the file when it is not valid JSON (e.g. truncated) or
        not a JSON object.
    """
    p = Path(run_dir)
    path = p / CARD_JSON if p.is_dir() or p.suffix != ".json" else p
    if not path.is_file():
        raise CardNotFoundError(
            f"{path}: no card found (write_card(run_dir, card) creates one)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CardError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    try:
        card = json.loads(text)
    except json.JSONDecodeError as err:
        raise CardError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}; "
            f"{len(text.encode())} bytes); the file may be truncated or hand-edited"
        ) from None
    if not isinstance(card, dict):
        raise CardError(f"{path}: expected a JSON object, got {type(card).__name__}")
    return card


# ------------------------------------------------------------------ markdown

def _inline(value: Any, nested: bool = False) -> str:
    if value is None:
        return "*not stated*"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}={_inline(v, True)}" for k, v in value.items())
        return f"{{{inner}}}" if nested else inner
    if isinstance(value, list):
        inner = ", ".join(_inline(v, True) for v in value)
        return f"[{inner}]" if nested else (inner or "none")
    return str(value)


def _bullets(value: Any, indent: int = 0) -> list[str]:
    pad = "  " * indent
    if isinstance(value, Mapping):
        lines = []
        for k, v in value.items():
            if isinstance(v, (Mapping, list)) and v and any(
                    isinstance(x, (Mapping, list)) for x in (v.values() if isinstance(v, Mapping)
                                                            else v)):
                lines.append(f"{pad}- **{k}**:")
                lines.extend(_bullets(v, indent + 1))
            else:
                lines.append(f"{pad}- **{k}**: {_inline(v)}")
        return lines
    if isinstance(value, list):
        lines = []
        for i, v in enumerate(value, 1):
            if isinstance(v, Mapping) and "name" in v:
                rest = {k: x for k, x in v.items() if k != "name"}
                lines.append(f"{pad}{i}. `{v['name']}`" + (f" ({_inline(rest)})" if rest else ""))
            elif isinstance(v, (Mapping, list)):
                lines.append(f"{pad}{i}.")
                lines.extend(_bullets(v, indent + 1))
            else:
                lines.append(f"{pad}{i}. {_inline(v)}")
        return lines or [f"{pad}*none*"]
    return [f"{pad}{_inline(value)}"]


def _cell(value: Any) -> str:
    return _inline(value).replace("|", "\\|").replace("\n", " ")


def _evaluation(section: Any) -> list[str]:
    if not isinstance(section, Mapping):
        return _bullets(section)
    lines = []
    rest = {k: v for k, v in section.items() if k != "results"}
    if rest:
        lines.extend(_bullets(rest))
        lines.append("")
    results = section.get("results")
    if isinstance(results, list) and results:
        lines.append("| metric | value | protocol |")
        lines.append("|---|---:|---|")
        for r in results:
            r = r if isinstance(r, Mapping) else {"value": r}
            value = r.get("value")
            shown = f"{value:.4f}" if isinstance(value, float) else _cell(value)
            lines.append(f"| {_cell(r.get('metric'))} | {shown} | {_cell(r.get('protocol'))} |")
    else:
        lines.append("*no results recorded*")
    return lines


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as a human-readable Markdown page, one heading per section, ending with
    the list of missing source-discipline fields (if any)."""
    if not isinstance(card, Mapping):
        raise ValueError(f"card: expected a dict, got {type(card).__name__}")
    title = card.get("name") or "encoder"
    lines = [f"# Card: {title}", ""]
    if card.get("method"):
        lines += [f"Method: {_inline(card['method'])}.", ""]
    for section in SECTIONS + ("uses",):
        if section == "uses" and "uses" not in card:
            continue
        lines.append(f"## {_TITLES[section]}")
        lines.append("")
        value = card.get(section)
        if section == "evaluation":
            lines.extend(_evaluation(value))
        else:
            lines.extend(_bullets(value))
        lines.append("")
    missing = missing_fields(card)
    lines.append("## Missing fields")
    lines.append("")
    if missing:
        lines.append("These source-discipline fields are not stated:")
        lines.append("")
        lines.extend(f"- `{m}`" for m in missing)
    else:
        lines.append("None: every required field is stated.")
    lines.append("")
    return "\n".join(lines)
