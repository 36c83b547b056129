"""Build an index from a trained run and a dataset; bind a run's encoder to an index.

    index = build_index("runs/simclr", "indexes/mnist", data="mnist5k", kind="flat")

The encoder version is the sha256 of the run's ``weights.safetensors`` (as loaded, and
checked against the card's ``encoder.weights_sha256``); the index refuses vectors and
queries from any other version.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nearfar.index.membership import build_training_record
from nearfar.index.store import (
    EncoderMismatchError,
    IndexStoreError,
    VectorIndex,
    content_bytes,
    salted_sha256,
)
from nearfar.index.threshold import DEFAULT_THRESHOLD, resolve_threshold

WEIGHTS = "weights.safetensors"
BUNDLED = ("mnist5k", "digits")


@dataclass
class BoundEncoder:
    """A run's encoder with its version: ``encoder.embed(images)`` and ``weights_sha256``."""

    encoder: Any
    weights_sha256: str
    run_dir: Path
    card: dict[str, Any] | None

    def describe(self) -> dict[str, Any]:
        enc = (self.card or {}).get("encoder") or {}
        return {"weights_sha256": self.weights_sha256, "run_dir": str(self.run_dir),
                "architecture": enc.get("architecture"),
                "embedding_dim": int(self.encoder.embedding_dim),
                "card_name": (self.card or {}).get("name")}

    def embed(self, images: Any, batch_size: int = 512) -> np.ndarray:
        return self.encoder.embed(images, batch_size=batch_size).numpy()


def weights_sha256(run_dir: str | os.PathLike) -> str:
    from nearfar.durable import sha256_file

    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise IndexStoreError(f"{path}: missing; an index binds to a finished run's weights "
                              f"(`nearfar train` writes them at the end)")
    return sha256_file(path)


def bind_run(run_dir: str | os.PathLike, *, device: str = "auto") -> BoundEncoder:
    """Load a run's encoder and the sha256 of the weights it was loaded from."""
    from nearfar.api import load

    run = Path(run_dir)
    sha = weights_sha256(run)
    encoder = load(run, device=device)
    if not hasattr(encoder, "image_shape"):
        raise IndexStoreError(f"{run}: a text-pair run (dual encoder); `nearfar index` indexes "
                              f"image embeddings. Embed documents with "
                              f"nearfar.load(run).embed_documents(texts) and search them with "
                              f"the query embeddings")
    card_sha = ((encoder.card or {}).get("encoder") or {}).get("weights_sha256")
    if card_sha and card_sha != sha:
        raise EncoderMismatchError(f"{run}: the card records weights {card_sha[:12]}... but "
                                   f"{WEIGHTS} hashes to {sha[:12]}...; the weights were "
                                   f"replaced after the card was written")
    return BoundEncoder(encoder, sha, run, encoder.card)


def run_data_table(run_dir: str | os.PathLike, data: str | None = None) -> dict[str, Any]:
    """The run's recipe [data] table, with its source replaced by ``data`` when given:
    a bundled name (``mnist5k``, ``digits``), an image folder, or a .csv/.jsonl manifest."""
    import json

    from nearfar.recipe import recipe_from_dict

    saved = json.loads((Path(run_dir) / "recipe.json").read_text("utf-8"))
    table = dict(recipe_from_dict(saved["recipe"]).values["data"])
    if data is None:
        return table
    path = Path(data).expanduser()
    if data in BUNDLED and not path.exists():
        table.update(source=data, path="")
    elif path.is_dir():
        table.update(source="folder", path=str(path))
    elif path.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        table.update(source="manifest", path=str(path))
    else:
        raise IndexStoreError(f"--data: expected a bundled dataset ({', '.join(BUNDLED)}), an "
                              f"image folder or a .csv/.jsonl manifest, got {data!r}")
    return table


def _meta_row(meta: dict[str, list[Any]], i: int) -> dict[str, Any]:
    row = {}
    for column, values in meta.items():
        if column == "id":
            continue
        v = values[i]
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        row[column] = v
    return row


def build_index(run_dir: str | os.PathLike, out: str | os.PathLike, *, data: str | None = None,
                kind: str = "flat", params: dict[str, Any] | None = None,
                threshold: float | None = None, default_threshold: float = DEFAULT_THRESHOLD,
                subject_field: str = "subject", actor: str = "unknown",
                device: str = "auto", batch_size: int = 512) -> VectorIndex:
    """Embed a dataset with a run's encoder and write a new index directory.

    Args:
        run_dir: a finished run (weights, recipe.json, card.json).
        out: the new index directory (must not exist or be empty).
        data: what to index (see :func:`run_data_table`); default the run's own data.
        kind: ``flat`` (exact), ``ivf`` or ``hnsw``; ``params`` override the defaults.
        threshold: review threshold; default the audit's T* (see ``threshold``).
        subject_field: metadata column that ``delete --subject`` matches.
    """
    from nearfar.api import load_source

    bound = bind_run(run_dir, device=device)
    own = run_data_table(run_dir)
    table = run_data_table(run_dir, data)
    ds = load_source(table)
    if ds.image_shape != tuple(bound.encoder.image_shape):
        raise IndexStoreError(f"--data: images of shape {ds.image_shape} do not fit this "
                              f"encoder (trained on {tuple(bound.encoder.image_shape)}); set "
                              f"the image size / grayscale in the data or use another run")
    if len(ds) == 0:
        raise IndexStoreError("--data: the dataset is empty")
    value, source = resolve_threshold(run_dir, bound.card, threshold, default_threshold)
    salt = secrets.token_hex(32)
    same = {k: table[k] for k in ("source", "path")} == {k: own[k] for k in ("source", "path")}
    record = build_training_record(run_dir, bound.card, salt=bytes.fromhex(salt),
                                   subject_field=subject_field, dataset=ds if same else None)
    vectors = bound.embed(ds.images, batch_size=batch_size)
    index = VectorIndex.create(out, dim=vectors.shape[1], encoder=bound.describe(), kind=kind,
                               params=params, threshold=value, threshold_source=source,
                               subject_field=subject_field, train_vectors=vectors,
                               training_record=record, salt=salt, actor=actor)
    ids = [str(x) for x in ds.meta["id"]]
    metas = [_meta_row(ds.meta, i) for i in range(len(ds))]
    sha = ds.sha256()
    uint8 = str(ds.images.dtype) == "torch.uint8"
    salt_b = bytes.fromhex(salt)
    contents = [salted_sha256(salt_b, "content", content_bytes(img.numpy())) if uint8 else None
                for img in ds.images]
    index.add(ids, vectors, metas, encoder_sha256=bound.weights_sha256, actor=actor,
              contents=contents, sources=[sha] * len(ids), action="build",
              details={"dataset": {"name": ds.name, "sha256": sha, "n_items": len(ds)}})
    return index
