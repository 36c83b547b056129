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
    check_card(read_card(run), run)  # [] when it also fits the JSON Schema and every
                                     # attached audit file still has its recorded sha256
    attach_audit(run, run / "audit.json")          # by sha256; card.md re-rendered
    export_huggingface(run)                        # README.md with a model-index block

Every new card lists its ``intended_uses`` and ``out_of_scope_uses`` (by default biometric
identification, surveillance, policing, employment, credit, healthcare and
public-benefits decisions are out of scope) with the note that similarity alone is not
evidence of identity, intent or eligibility; a recipe's ``[card]`` section may declare
otherwise, and the card records who declared them.

Nothing here imports torch: a card can be read and checked anywhere. The JSON Schema
(``nearfar/schemas/card.schema.json``) is applied with ``jsonschema``, imported only by
:func:`schema_errors` / :func:`check_card`.
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
    "benchmark",
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
    "benchmark": "Benchmark",
    "seed": "Seed",
    "software": "Software",
    "created": "Created",
    "uses": "Uses",
    "intended_uses": "Intended uses",
    "out_of_scope_uses": "Out-of-scope uses",
    "audits": "Audits",
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
    "benchmark.name",
    "intended_uses",
    "out_of_scope_uses",
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

#: what every new card lists as intended, unless the recipe's [card] section says otherwise
DEFAULT_INTENDED_USES = (
    "research on representation learning: comparing objectives, views and encoders",
    "nearest-neighbour retrieval, deduplication and clustering of data like the training "
    "data, with a person reviewing what is acted on",
)
#: uses a similarity model must not be put to unless the user declares otherwise
DEFAULT_OUT_OF_SCOPE_USES = (
    "biometric identification",
    "surveillance",
    "policing",
    "employment decisions",
    "credit decisions",
    "healthcare decisions",
    "public-benefits decisions",
)
#: stated on every card next to its uses
SIMILARITY_NOTE = "similarity alone is not evidence of identity, intent or eligibility"


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
               benchmark: Mapping[str, Any] | None = None,
               intended_uses: Sequence[str] | None = None,
               out_of_scope_uses: Sequence[str] | None = None,
               uses_declared_by: str | None = None,
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
        benchmark: ``{"name": ..., "metrics": [...]}``: what the results are measured on.
        intended_uses, out_of_scope_uses: lists of strings; each defaults to
            :data:`DEFAULT_INTENDED_USES` / :data:`DEFAULT_OUT_OF_SCOPE_USES` (biometric
            identification, surveillance, policing, employment, credit, healthcare and
            public-benefits decisions). Every card also carries :data:`SIMILARITY_NOTE`.
        uses_declared_by: who declared the uses (default "nearfar defaults" when both
            lists are the defaults, else "the caller"; the API passes "recipe").
        uses: older form ``{"intended": [...], "out_of_scope": [...]}`` of the two lists.
    """
    method = dict(method or {})
    m_encoder = method.get("encoder") or {}
    encoder_from_method = {
        k2: m_encoder[k1] for k1, k2 in
        (("class", "architecture"), ("parameters", "parameter_count"), ("out_dim", "embedding_dim"))
        if k1 in m_encoder
    } or None

    if uses is not None:
        intended_uses = uses.get("intended", intended_uses)
        out_of_scope_uses = uses.get("out_of_scope", out_of_scope_uses)
    if uses_declared_by is None:
        uses_declared_by = ("nearfar defaults" if intended_uses is None
                            and out_of_scope_uses is None else "the caller")
    intended_uses = _string_list(DEFAULT_INTENDED_USES if intended_uses is None
                                 else intended_uses, "intended_uses")
    out_of_scope_uses = _string_list(DEFAULT_OUT_OF_SCOPE_USES if out_of_scope_uses is None
                                     else out_of_scope_uses, "out_of_scope_uses")

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
        "benchmark": None if benchmark is None else dict(benchmark),
        "seed": seed,
        "software": dict(software) if software is not None else software_versions(),
        "created": created if created is not None else
        _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    for key in ("method", "reference"):
        if key in method:
            card.setdefault("method", {})[key] = method[key]
    card["intended_uses"] = intended_uses
    card["out_of_scope_uses"] = out_of_scope_uses
    card["uses_note"] = SIMILARITY_NOTE
    card["uses_declared_by"] = uses_declared_by
    return _plain(card, "card")


def _string_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or any(
            not isinstance(v, str) or not v.strip() for v in value):
        raise ValueError(f"{name}: expected a list of non-empty strings, got {value!r}")
    return list(value)


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


# ------------------------------------------------------------------ schema and check

SCHEMA_RESOURCE = "card.schema.json"


def card_schema() -> dict[str, Any]:
    """The JSON Schema of ``card.json`` (shipped as ``nearfar/schemas/card.schema.json``)."""
    from importlib import resources

    text = resources.files("nearfar.schemas").joinpath(SCHEMA_RESOURCE).read_text("utf-8")
    return json.loads(text)


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "card"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def schema_errors(card: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(dotted path, message)`` for every place the card breaks the JSON Schema.

    Validated with the ``jsonschema`` package (Draft 2020-12). A missing property is
    reported at its own path (``encoder.weights_sha256``), not at its parent.
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(card_schema())
    out: list[tuple[str, str]] = []
    for err in sorted(validator.iter_errors(card), key=lambda e: list(map(str, e.absolute_path))):
        where = list(err.absolute_path)
        if err.validator == "required":
            for name in err.validator_value:
                if isinstance(err.instance, Mapping) and name not in err.instance:
                    out.append((_dotted([*where, name]), "missing"))
            continue
        if err.validator == "anyOf":
            message = f"expected {_expected(err.validator_value)}, got {_short(err.instance)}"
        elif err.validator == "pattern" and err.validator_value == "^[0-9a-f]{64}$":
            message = f"expected a sha256 (64 lowercase hex digits), got {_short(err.instance)}"
        elif err.validator in ("minLength", "pattern") and err.validator_value in (1, "\\S"):
            message = f"expected a non-empty string, got {_short(err.instance)}"
        elif err.validator == "type":
            message = f"expected {_type_words(err.validator_value)}, got {_short(err.instance)}"
        else:
            message = err.message
        out.append((_dotted(where), message))
    return out


def _type_words(t: Any) -> str:
    words = {"object": "an object", "array": "a list", "string": "a string",
             "integer": "an integer", "number": "a number", "boolean": "true/false"}
    if isinstance(t, list):
        return " or ".join(words.get(x, x) for x in t)
    return words.get(t, str(t))


def _expected(options: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for o in options:
        if "$ref" in o:
            parts.append("a non-empty string")
        elif "type" in o:
            parts.append(_type_words(o["type"]) + (" (non-empty)" if "minItems" in o
                                                   or "minProperties" in o else ""))
    return " or ".join(dict.fromkeys(parts)) or "another value"


def _audit_path(run_dir: Path, recorded: str) -> Path:
    p = Path(recorded)
    return p if p.is_absolute() else run_dir / p


def audit_problems(card: Mapping[str, Any], run_dir: str | os.PathLike) -> list[str]:
    """One line per attached audit whose file is missing or whose sha256 has changed."""
    run = Path(run_dir)
    run = run.parent if run.suffix == ".json" and not run.is_dir() else run
    problems = []
    audits = card.get("audits") or []
    for i, audit in enumerate(audits if isinstance(audits, list) else []):
        if not isinstance(audit, Mapping) or not audit.get("path"):
            continue                                   # the schema check names it
        path = _audit_path(run, str(audit["path"]))
        label = f"audits[{i}] ({audit.get('kind', 'audit')})"
        if not path.is_file():
            problems.append(f"{label}: {path} is missing; re-run the audit or detach it")
            continue
        digest = sha256_file(path)
        if digest != audit.get("sha256"):
            problems.append(f"{label}: {path} changed since it was attached (sha256 "
                            f"{digest[:12]}..., card records {str(audit.get('sha256'))[:12]}...)")
    return problems


def check_card(card: Mapping[str, Any], run_dir: str | os.PathLike | None = None
               ) -> list[str]:
    """Every problem with a card, one line each, naming the field: missing
    source-discipline fields (:func:`missing_fields`), values that break the JSON Schema
    (:func:`card_schema`), and, given ``run_dir``, attached audits whose file is missing
    or changed. An empty list means the card passes ``nearfar card check``.
    """
    if not isinstance(card, Mapping):
        raise ValueError(f"card: expected a dict, got {type(card).__name__}")
    missing = missing_fields(card)
    problems = [f"{m}: missing" for m in missing]
    reported = set(missing)
    for path, message in schema_errors(card):
        if any(path == m or m.startswith(path + ".") or m.startswith(path + "[")
               or path.startswith(m + ".") for m in reported):
            continue
        reported.add(path)
        problems.append(f"{path}: {message}")
    if run_dir is not None:
        problems += audit_problems(card, run_dir)
    return problems


# ------------------------------------------------------------------ audits

def attach_audit(run_dir: str | os.PathLike, audit_path: str | os.PathLike, *,
                 kind: str | None = None, summary: Any = None,
                 created: str | None = None) -> dict[str, Any]:
    """Attach an audit file to a run's card by its sha256 and re-render ``card.md``.

    The card's ``audits`` list gets ``{"kind", "path", "sha256", "created", "summary"}``;
    attaching the same path again replaces its entry (a re-run audit). ``nearfar card
    check`` then verifies that the file is still there with the same hash.

    Args:
        run_dir: the run directory whose card.json gets the audit.
        audit_path: the audit's file; stored relative to ``run_dir`` when inside it,
            else as an absolute path.
        kind: e.g. "hubness"; default: the file's JSON ``kind`` field, else its stem.
        summary: plain data shown on the card (a few headline numbers); default: the
            file's JSON ``summary`` field, if any.
        created: ISO 8601 time; default now (UTC).

    Returns:
        The audit entry written to the card.
    """
    run = Path(run_dir)
    card = read_card(run)
    path = Path(audit_path)
    if not path.is_file():
        raise FileNotFoundError(f"audit_path: {path} is not a file; write the audit first")
    content: Any = None
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            content = None
    if kind is None:
        kind = content.get("kind") if isinstance(content, dict) else None
        kind = kind if isinstance(kind, str) and kind.strip() else path.stem
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError(f"kind: expected a non-empty string, got {kind!r}")
    if summary is None and isinstance(content, dict):
        summary = content.get("summary")
    try:
        stored = path.resolve().relative_to(run.resolve()).as_posix()
    except ValueError:
        stored = str(path.resolve())
    entry = _plain({
        "kind": kind,
        "path": stored,
        "sha256": sha256_file(path),
        "created": created if created is not None else
        _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
    }, "audit")
    audits = [a for a in (card.get("audits") or [])
              if not (isinstance(a, Mapping) and a.get("path") == stored)]
    card["audits"] = [*audits, entry]
    write_card(run, card)
    return entry


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


def _audits(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        return ["*no audits attached*"]
    lines = ["| kind | file | sha256 | created | summary |", "|---|---|---|---|---|"]
    for a in value:
        a = a if isinstance(a, Mapping) else {}
        lines.append(f"| {_cell(a.get('kind'))} | `{_cell(a.get('path'))}` | "
                     f"`{_cell(a.get('sha256'))}` | {_cell(a.get('created'))} | "
                     f"{_cell(a.get('summary'))} |")
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
    for section in SECTIONS + ("intended_uses", "out_of_scope_uses", "audits", "uses"):
        if section in ("uses", "audits") and section not in card:
            continue
        lines.append(f"## {_TITLES[section]}")
        lines.append("")
        value = card.get(section)
        if section == "evaluation":
            lines.extend(_evaluation(value))
        elif section == "audits":
            lines.extend(_audits(value))
        else:
            lines.extend(_bullets(value))
        if section == "out_of_scope_uses":
            if card.get("uses_note"):
                lines += ["", f"Note: {card['uses_note']}."]
            if card.get("uses_declared_by"):
                lines += ["", f"Uses declared by: {card['uses_declared_by']}."]
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


# ------------------------------------------------------------------ Hugging Face export

#: Hugging Face task type of the classification protocols on image data
_CLASSIFICATION = ("knn", "linear_probe")


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text:      # YAML 1.1 floats need a dot: 1e-05 -> 1.0e-05
            text = text.replace("e", ".0e", 1)
        return text
    return json.dumps(str(value), ensure_ascii=False)   # a JSON string is a YAML scalar


def to_yaml(value: Any, indent: int = 0) -> list[str]:
    """Plain data (dicts, lists, str, numbers, bool, None) as block-style YAML lines;
    every string is double-quoted, so no value is read back as another type."""
    pad = "  " * indent
    if isinstance(value, Mapping):
        if not value:
            return [pad + "{}"]
        lines = []
        for k, v in value.items():
            key = _yaml_scalar(str(k)) if not str(k).replace("-", "").replace(
                "_", "").isalnum() else str(k)
            if isinstance(v, (Mapping, list)) and v:
                lines.append(f"{pad}{key}:")
                lines.extend(to_yaml(v, indent + 1))
            else:
                lines.append(f"{pad}{key}: {to_yaml(v)[0].strip()}")
        return lines
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        lines = []
        for v in value:
            inner = to_yaml(v, indent + 1)
            lines.append(f"{pad}- {inner[0].strip()}")
            lines.extend(inner[1:])
        return lines
    return [pad + _yaml_scalar(value)]


def _protocol_words(protocol: Any) -> str:
    """The protocol's name and scalar settings in one line (nested ones: on the card)."""
    if not isinstance(protocol, Mapping):
        return str(protocol)
    parts = [f"{k}={_inline(v, True)}" for k, v in protocol.items()
             if k != "name" and not isinstance(v, (Mapping, list))]
    nested = [k for k, v in protocol.items() if isinstance(v, (Mapping, list))]
    if nested:
        parts.append(f"{', '.join(nested)}: see the card")
    rest = ", ".join(parts)
    return f"{protocol.get('name', 'protocol')}: {rest}" if rest else str(protocol.get("name"))


def huggingface_metadata(card: Mapping[str, Any]) -> dict[str, Any]:
    """The YAML front matter of a Hugging Face model card, as plain data.

    ``model-index`` has one entry per evaluation protocol (grouped by the protocol's
    ``name``); each metric's ``name`` states its protocol in full, so no number leaves
    without the way it was measured.
    """
    dataset = card.get("dataset") if isinstance(card.get("dataset"), Mapping) else {}
    modality = str(card.get("modality") or "")
    method = card.get("method") if isinstance(card.get("method"), Mapping) else {}
    objective = card.get("objective") if isinstance(card.get("objective"), Mapping) else {}
    tags = ["nearfar", "contrastive-learning", "representation-learning"]
    for extra in (method.get("method"), objective.get("loss"), modality or None):
        if isinstance(extra, str) and extra and extra not in tags:
            tags.append(extra)
    meta: dict[str, Any] = {"library_name": "nearfar", "tags": tags}
    license_ = card.get("license") or dataset.get("license")
    if isinstance(license_, str) and license_.strip():
        meta["license"] = license_
    dataset_name = str(dataset.get("name") or "unknown")
    if dataset.get("name"):
        meta["datasets"] = [dataset_name]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    results = (card.get("evaluation") or {}).get("results") if isinstance(
        card.get("evaluation"), Mapping) else None
    for r in results if isinstance(results, list) else []:
        if not isinstance(r, Mapping) or not isinstance(r.get("value"), (int, float)):
            continue
        protocol = r.get("protocol") if isinstance(r.get("protocol"), Mapping) else {}
        groups.setdefault(str(protocol.get("name") or "unstated protocol"), []).append(r)
    entries = []
    for protocol_name, rs in groups.items():
        if protocol_name in _CLASSIFICATION:
            task = "image-classification" if "image" in modality else "feature-extraction"
        elif protocol_name.startswith("zero-shot"):
            task = "zero-shot-image-classification"
        else:
            task = "feature-extraction"
        benchmark = card.get("benchmark") if isinstance(card.get("benchmark"), Mapping) else {}
        entries.append({
            "task": {"type": task, "name": protocol_name},
            "dataset": {"name": str(benchmark.get("name") or dataset_name),
                        "type": dataset_name, "split": "test"},
            "metrics": [{"type": str(r.get("metric")), "value": float(r["value"]),
                         "name": f"{r.get('metric')} ({_protocol_words(r.get('protocol'))})"}
                        for r in rs],
        })
    meta["model-index"] = [{"name": str(card.get("name") or "nearfar encoder"),
                            "results": entries}]
    return meta


def huggingface_readme(card: Mapping[str, Any]) -> str:
    """A Hugging Face model card: YAML front matter (:func:`huggingface_metadata`) and the
    card rendered as Markdown (:func:`render_markdown`)."""
    if not isinstance(card, Mapping):
        raise ValueError(f"card: expected a dict, got {type(card).__name__}")
    front = "\n".join(to_yaml(huggingface_metadata(card)))
    return f"---\n{front}\n---\n\n{render_markdown(card)}"


def export_huggingface(run_dir: str | os.PathLike, out: str | os.PathLike | None = None
                       ) -> Path:
    """Write the run's card as a Hugging Face ``README.md`` (default: ``RUN_DIR/README.md``).

    Returns:
        The path written.
    """
    card = read_card(run_dir)
    p = Path(run_dir)
    target = Path(out) if out is not None else (p if p.is_dir() else p.parent) / "README.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, huggingface_readme(card).encode("utf-8"))
    return target
