"""Manifests: a CSV or JSONL file listing images and their metadata, one row per image."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nearfar.data.dataset import ImageDataset
from nearfar.data.images import read_images

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{path}: unsupported manifest format {path.suffix or '(no extension)'!r}; use "
            f".csv (a header row, then one row per image) or .jsonl (one JSON object per "
            f"line), each with a 'path' column"
        )
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    if kind == "csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            for line, raw in enumerate(reader, start=2):
                if None in raw:
                    raise ValueError(
                        f"{path} line {line}: more values than header columns "
                        f"({len(columns)}); quote values that contain commas"
                    )
                row = {k.strip(): (v.strip() if isinstance(v, str) else v)
                       for k, v in raw.items()}
                if not any(v not in (None, "") for v in row.values()):
                    continue  # blank line
                rows.append(row)
    else:
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {line}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(
                        f"{path} line {line}: expected a JSON object like "
                        f'{{"path": "a.png", "label": 3}}, got {type(obj).__name__}'
                    )
                rows.append(obj)
                columns += [k for k in obj if k not in columns]
    return rows, columns


def _is_int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, str):
        s = value.strip()
        return s.lstrip("-").isdigit()
    return False


def _encode_labels(raw: list[Any], path: Path) -> tuple[list[int], list[str] | None]:
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError(
                f"{path}: row {i + 1} has an empty label; give every row a label or drop "
                f"the 'label' column for unlabelled data"
            )
    if all(_is_int_like(v) for v in raw):
        ints = [int(v) for v in raw]
        if min(ints) < 0:
            raise ValueError(f"{path}: integer labels must be >= 0, got {min(ints)}")
        return ints, None
    names = sorted({str(v) for v in raw})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v)] for v in raw], names


def load_manifest(path: str | Path, *, root: str | Path | None = None, strict: bool = False,
                  image_size: int | Sequence[int] | None = None, grayscale: bool | None = None,
                  name: str | None = None, version: str = "1") -> ImageDataset:
    """Load the images a CSV or JSONL manifest lists, with all its columns as metadata.

    Columns:

    - ``path`` (required): the image file, relative to ``root`` (default: the
      manifest's folder) unless absolute.
    - ``label`` (optional): integers are used as they are; strings are mapped to
      integers in sorted order, the names kept in ``label_names`` and meta ``label_name``.
    - ``id`` (optional, unique): defaults to the ``path`` value.
    - ``group`` and any other column: carried into meta unchanged (CSV values stay
      strings; JSONL values keep their JSON types; missing keys become None).

    Rows whose image cannot be read (missing or corrupt file) are skipped with one
    warning giving the count and the first paths, or raise with ``strict=True``.

    Args:
        path: the ``.csv`` or ``.jsonl`` (``.ndjson``) file.
        root: folder that relative image paths start from.
        strict, image_size, grayscale: as in :func:`nearfar.data.load_image_folder`.
        name, version: recorded on the dataset (name defaults to the manifest's stem).
    """
    manifest = Path(path).expanduser()
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest}: no such manifest file; check the path")
    if manifest.is_dir():
        raise ValueError(
            f"{manifest}: expected a .csv or .jsonl manifest file, got a folder; for a folder "
            f"of images use nearfar.data.load_image_folder"
        )
    rows, columns = _read_rows(manifest)
    if "path" not in columns:
        found = ", ".join(repr(c) for c in columns) or "none"
        raise ValueError(
            f"{manifest}: missing the required 'path' column (found columns: {found}); add a "
            f"'path' column giving each image file, relative to the manifest's folder"
        )
    if not rows:
        raise ValueError(f"{manifest}: the manifest lists no images (no data rows)")
    base = Path(root).expanduser() if root is not None else manifest.parent
    if root is not None and not base.is_dir():
        raise FileNotFoundError(f"root: {base} is not a folder; check the path")
    for i, row in enumerate(rows):
        value = row.get("path")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{manifest}: row {i + 1} has no image path (path={value!r}); every row "
                f"needs a 'path'"
            )
    files = [Path(str(row["path"])).expanduser() for row in rows]
    files = [p if p.is_absolute() else base / p for p in files]

    all_labels: list[int] | None = None
    label_names: list[str] | None = None
    if "label" in columns:
        # encoded over every row, so indices do not depend on which files decode
        all_labels, label_names = _encode_labels([r.get("label") for r in rows], manifest)

    images, kept = read_images(files, image_size=image_size, grayscale=grayscale,
                               strict=strict, where=str(manifest))
    kept_rows = [rows[i] for i in kept]
    meta: dict[str, list[Any]] = {c: [r.get(c) for r in kept_rows] for c in columns}
    if "id" not in columns:
        meta["id"] = [r["path"] for r in kept_rows]
    labels = None
    if all_labels is not None:
        meta.pop("label")
        ints = [all_labels[i] for i in kept]
        labels = torch.tensor(ints, dtype=torch.int64)
        if label_names is not None:
            meta["label_name"] = [label_names[k] for k in ints]
    return ImageDataset(
        images=images,
        labels=labels,
        meta=meta,
        name=name or manifest.stem,
        version=version,
        source=f"manifest {manifest.resolve()}",
        label_names=label_names,
    )
