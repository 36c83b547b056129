"""Text pairs for dual encoders: (query, document) pairs, such as a docstring and the code
it documents, held as strings and as UTF-8 bytes, with a group per pair for splitting.

The bundled corpus needs no download: :func:`stdlib_code_pairs` walks the installed Python
standard library with :mod:`ast` and pairs each documented function's docstring summary
(the query) with its code, docstring removed (the document). Pairs are grouped by
top-level module, and :func:`group_split` holds whole modules out, so the held-out
evaluation asks about code the encoder never saw (the setting of CodeSearchNet, Husain
et al., 2019). Your own pairs load from JSONL or CSV with :func:`load_text_pairs`.

    from nearfar.data import stdlib_code_pairs, group_split
    pairs = stdlib_code_pairs()             # ~5,000 pairs from ~170 stdlib modules
    train, test = group_split(pairs, test_size=0.2, seed=0)

A :class:`TextPairDataset` carries ``extras["query"]`` and ``extras["document"]`` (uint8
(N, W) UTF-8 bytes, zero-padded) that the trainer indexes into every batch; it has no
images (``images`` is None).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nearfar.nn.text import texts_to_utf8

#: stdlib folders left out of the corpus: tests (near-duplicate code, docstrings that
#: describe tests), vendored or demo code, GUI code
SKIPPED_STDLIB_PARTS = frozenset({
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
    "__phello__", "ensurepip", "tkinter", "pydoc_data",
})


class TextPairError(ValueError):
    """A text-pair file is missing, malformed, or lacks a required column."""


def _cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits in ``max_bytes``."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


@dataclass
class TextPairDataset:
    """N (query, document) text pairs with aligned metadata.

    Attributes:
        queries, documents: the texts (lists of N strings, none empty, no NUL).
        meta: per-item metadata, ``column -> list`` of length N; always has ``id`` and
            ``group`` (what :func:`group_split` keeps together: a module, a repository, a
            subject).
        name, version, source: where the pairs came from; copied into the model card.
        split: None for a whole dataset, else how a part was made.
        max_query_bytes, max_document_bytes: byte width of the UTF-8 rows in
            :attr:`extras`; longer texts are cut at a character boundary there (the
            strings in :attr:`queries` / :attr:`documents` stay whole).

    ``extras`` holds ``{"query": uint8 (N, Wq), "document": uint8 (N, Wd)}``; ``images``
    and ``labels`` are None (a trainer treats such data as text only).
    """

    queries: list[str]
    documents: list[str]
    meta: dict[str, list[Any]] = field(default_factory=dict)
    name: str = "text-pairs"
    version: str = "1"
    source: str = ""
    split: dict[str, Any] | None = None
    max_query_bytes: int = 512
    max_document_bytes: int = 2048
    extras: dict[str, Tensor] = field(init=False, repr=False)

    images = None
    labels = None
    modality = "text-text"

    def __post_init__(self) -> None:
        for name in ("queries", "documents"):
            texts = getattr(self, name)
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{name}: expected a list of strings")
            empty = [i for i, t in enumerate(texts) if not t.strip()]
            if empty:
                raise ValueError(f"{name}: items {empty[:5]} are empty; drop those pairs")
        if len(self.queries) != len(self.documents):
            raise ValueError(f"documents: expected {len(self.queries)} like the queries, got "
                             f"{len(self.documents)}")
        n = len(self.queries)
        meta = {k: list(v) for k, v in self.meta.items()}
        meta.setdefault("id", list(range(n)))
        meta.setdefault("group", list(meta["id"]))
        for key, column in meta.items():
            if len(column) != n:
                raise ValueError(f"meta[{key!r}]: expected {n} values like the pairs, got "
                                 f"{len(column)}")
        self.meta = meta
        self.extras = {
            "query": texts_to_utf8([_cut_utf8(t, self.max_query_bytes) for t in self.queries],
                                   self.max_query_bytes),
            "document": texts_to_utf8([_cut_utf8(t, self.max_document_bytes)
                                       for t in self.documents], self.max_document_bytes),
        }

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def groups(self) -> list[Any]:
        return self.meta["group"]

    def subset(self, indices: Sequence[int] | Tensor) -> TextPairDataset:
        """The pairs at ``indices`` (in that order), metadata kept aligned."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        n = len(self)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise IndexError(f"indices: expected values in [0, {n}), got {bad[:5]}")
        return TextPairDataset(
            queries=[self.queries[i] for i in idx], documents=[self.documents[i] for i in idx],
            meta={k: [v[i] for i in idx] for k, v in self.meta.items()}, name=self.name,
            version=self.version, source=self.source,
            split=None if self.split is None else dict(self.split),
            max_query_bytes=self.max_query_bytes, max_document_bytes=self.max_document_bytes)

    def sha256(self) -> str:
        """Hex digest of the texts and groups, in order (the same pairs hash the same)."""
        h = hashlib.sha256()
        for q, d, g in zip(self.queries, self.documents, self.meta["group"]):
            for part in (q, d, str(g)):
                data = part.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Plain-data description for the model card."""
        groups = self.meta["group"]
        out: dict[str, Any] = {
            "name": self.name, "version": self.version, "source": self.source,
            "sha256": self.sha256(), "n_items": len(self), "modality": self.modality,
            "n_groups": len(set(groups)), "meta_columns": sorted(self.meta),
            "max_query_bytes": self.max_query_bytes,
            "max_document_bytes": self.max_document_bytes,
        }
        if self.split is not None:
            out["split"] = dict(self.split)
        return out

    def __repr__(self) -> str:
        split = f", split={self.split.get('part')!r}" if self.split else ""
        return (f"TextPairDataset(name={self.name!r}, n={len(self)}, "
                f"groups={len(set(self.meta['group']))}{split})")


# ------------------------------------------------------------------ the stdlib corpus

_SPACE = re.compile(r"\s+")
_WORDS = re.compile(r"[A-Za-z]{2,}")


def docstring_summary(doc: str, max_chars: int = 300) -> str:
    """The first paragraph of a docstring on one line, cut to ``max_chars`` at a word."""
    first = doc.strip().split("\n\n", 1)[0]
    text = _SPACE.sub(" ", first).strip()
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


def _without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's source (normalised by :func:`ast.unparse`) minus its docstring."""
    body = node.body[1:] or [ast.Pass()]
    clone = type(node)(**{**{f: getattr(node, f) for f in node._fields}, "body": body})
    clone.lineno, clone.col_offset = node.lineno, node.col_offset
    return ast.unparse(ast.fix_missing_locations(clone))


def _module_files(root: Path, packages: Iterable[str] | None) -> list[tuple[str, Path]]:
    wanted = None if packages is None else set(packages)
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts) & SKIPPED_STDLIB_PARTS:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or (wanted is not None and parts[0] not in wanted):
            continue
        out.append((".".join(parts), path))
    return out


def code_pairs_from_source(source: str, module: str, *, max_query_chars: int = 300,
                           max_code_chars: int = 2000, min_query_words: int = 3
                           ) -> list[dict[str, Any]]:
    """(docstring summary, code) pairs of every documented function in one module's source.

    Functions whose body is only a docstring, whose summary has fewer than
    ``min_query_words`` words (runs of two or more letters), or whose code (docstring
    removed) is longer than ``max_code_chars`` are skipped. Returns dicts with ``query``,
    ``document``, ``module``, ``qualname`` and ``line``.
    """
    tree = ast.parse(source)
    pairs: list[dict[str, Any]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child)
                if doc and len(child.body) > 1:
                    query = docstring_summary(doc, max_query_chars)
                    code = _without_docstring(child)
                    if len(_WORDS.findall(query)) >= min_query_words \
                            and len(code) <= max_code_chars \
                            and "\0" not in query + code:
                        pairs.append({"query": query, "document": code, "module": module,
                                      "qualname": prefix + child.name, "line": child.lineno})
                visit(child, f"{prefix}{child.name}.<locals>.")

    visit(tree, "")
    return pairs


def stdlib_root() -> Path:
    """Folder of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


_CACHE: dict[tuple, TextPairDataset] = {}


def stdlib_code_pairs(packages: Iterable[str] | None = None, *, max_query_chars: int = 300,
                      max_code_chars: int = 2000, min_query_words: int = 3,
                      root: str | os.PathLike | None = None) -> TextPairDataset:
    """(docstring, code) pairs from the installed Python standard library.

    Every ``.py`` file under :func:`stdlib_root` (tests, vendored and GUI packages
    excepted, see :data:`SKIPPED_STDLIB_PARTS`) is parsed with :mod:`ast` (never imported);
    each documented function or method gives one pair: its docstring's first paragraph
    (query) and its code without the docstring (document). Exact duplicate documents are
    kept once. ``meta["group"]`` is the top-level module (``email`` for
    ``email.mime.text``), the unit :func:`group_split` holds out; ``meta["module"]`` and
    ``meta["qualname"]`` say where each pair came from.

    Args:
        packages: only these top-level modules (e.g. ``["json", "csv"]``); None: all.
        max_query_chars, max_code_chars, min_query_words: see
            :func:`code_pairs_from_source`.
        root: a standard-library folder other than the running interpreter's.

    The corpus depends on the Python version: the dataset's ``version`` says which, and
    its sha256 (on the card) pins the exact pairs.
    """
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"root: {base} is not a folder; pass the folder of a Python "
                                f"standard library")
    key = (str(base), None if packages is None else tuple(sorted(packages)), max_query_chars,
           max_code_chars, min_query_words)
    if key in _CACHE:
        return _CACHE[key].subset(range(len(_CACHE[key])))
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for module, path in _module_files(base, packages):
        try:
            source = path.read_text("utf-8")
            found = code_pairs_from_source(source, module, max_query_chars=max_query_chars,
                                           max_code_chars=max_code_chars,
                                           min_query_words=min_query_words)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse (e.g. written for another version)
        for row in found:
            if row["document"] not in seen:
                seen.add(row["document"])
                rows.append(row)
    if not rows:
        raise ValueError(f"packages: no documented functions found under {base} for "
                         f"{sorted(packages) if packages is not None else 'all modules'}")
    version = f"python-{sys.version_info.major}.{sys.version_info.minor}"
    ds = TextPairDataset(
        queries=[r["query"] for r in rows], documents=[r["document"] for r in rows],
        meta={"id": list(range(len(rows))), "group": [r["module"].split(".")[0] for r in rows],
              "module": [r["module"] for r in rows], "qualname": [r["qualname"] for r in rows],
              "line": [r["line"] for r in rows]},
        name="stdlib_code", version=version,
        source=f"docstring/code pairs parsed with ast from the Python {sys.version.split()[0]} "
               f"standard library at {base}")
    _CACHE[key] = ds
    return ds.subset(range(len(ds)))


# ------------------------------------------------------------------ user files

def load_text_pairs(path: str | os.PathLike, *, query_column: str = "query",
                    document_column: str = "document", group_column: str | None = "group",
                    name: str | None = None) -> TextPairDataset:
    """(query, document) pairs from a ``.jsonl`` file (one object per line) or a ``.csv``
    file with a header row. ``group_column`` (optional in the file) keeps related pairs
    on one side of :func:`group_split`; other columns are kept as metadata."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: no text-pair file at {p}; expected a .jsonl or .csv "
                                f"file with {query_column!r} and {document_column!r} columns")
    rows: list[dict[str, Any]] = []
    if p.suffix.lower() == ".jsonl":
        for n, line in enumerate(p.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TextPairError(f"{p}:{n}: not valid JSON ({exc.msg}); expected one object "
                                    f"per line") from None
            if not isinstance(row, dict):
                raise TextPairError(f"{p}:{n}: expected a JSON object, got "
                                    f"{type(row).__name__}")
            rows.append(row)
    elif p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise TextPairError(f"path: expected a .jsonl or .csv file, got {p.name}")
    if not rows:
        raise TextPairError(f"{p}: no pairs found")
    for n, row in enumerate(rows, 1):
        for col in (query_column, document_column):
            value = row.get(col)
            if not isinstance(value, str) or not value.strip():
                raise TextPairError(f"{p}: row {n} has no text in column {col!r}; every row "
                                    f"needs {query_column!r} and {document_column!r}")
    columns = sorted({k for r in rows for k in r} - {query_column, document_column})
    meta = {c: [r.get(c) for r in rows] for c in columns}
    if group_column is not None and group_column in meta and group_column != "group":
        meta["group"] = meta[group_column]
    return TextPairDataset(queries=[r[query_column] for r in rows],
                           documents=[r[document_column] for r in rows], meta=meta,
                           name=name or p.stem, source=str(p))


# ------------------------------------------------------------------ splits

def group_split(ds: TextPairDataset, test_size: float | int = 0.2, *, seed: int = 0
                ) -> tuple[TextPairDataset, TextPairDataset]:
    """Train / test parts with no group on both sides (held-out modules, repositories...).

    Groups are shuffled with ``seed`` and added to the test part until it holds
    ``test_size`` pairs (a fraction < 1 of all pairs, or a count >= 1); the rest trains.
    """
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) \
            or not test_size > 0:
        raise ValueError(f"test_size: expected a fraction in (0, 1) or a count >= 1, got "
                         f"{test_size!r}")
    n = len(ds)
    target = int(round(test_size * n)) if test_size < 1 else int(test_size)
    groups: dict[Any, list[int]] = {}
    for i, g in enumerate(ds.meta["group"]):
        groups.setdefault(g, []).append(i)
    if len(groups) < 2:
        raise ValueError(f"data: a group split needs at least 2 groups, got {len(groups)}")
    if not 0 < target < n:
        raise ValueError(f"test_size: {test_size!r} leaves no pairs on one side of {n}")
    names = sorted(groups, key=str)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    test_idx: list[int] = []
    test_groups: list[Any] = []
    for j in order:
        if len(test_idx) >= target:
            break
        if len(test_groups) == len(names) - 1:
            break  # keep at least one group for training
        test_groups.append(names[j])
        test_idx.extend(groups[names[j]])
    held = set(test_groups)
    train_idx = [i for i in range(n) if ds.meta["group"][i] not in held]
    test_idx.sort()
    how = {"seed": seed, "test_size": test_size, "by": "group",
           "test_groups": sorted(map(str, held))}
    train, test = ds.subset(train_idx), ds.subset(test_idx)
    train.split, test.split = {"part": "train", **how}, {"part": "test", **how}
    return train, test


__all__ = [
    "SKIPPED_STDLIB_PARTS", "TextPairDataset", "TextPairError", "code_pairs_from_source",
    "docstring_summary", "group_split", "load_text_pairs", "stdlib_code_pairs", "stdlib_root",
]
