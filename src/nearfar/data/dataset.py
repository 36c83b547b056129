"""The in-memory image dataset every loader returns.

An :class:`ImageDataset` holds a whole (small to medium) image collection as one
tensor, so that a batch is a single index operation and no per-item Python runs
while training. Per-item metadata travels in :attr:`ImageDataset.meta` as plain
columns (``column -> list``) that stay aligned with the images through
:meth:`ImageDataset.subset`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


@dataclass
class ImageDataset:
    """Images, optional integer labels and per-item metadata, all aligned by position.

    Attributes:
        images: (N, C, H, W) tensor, ``uint8`` in 0..255 (preferred: a quarter of the
            memory) or floating point in [0, 1]. Use :meth:`float_images` for a float
            copy in [0, 1] either way.
        labels: (N,) ``int64`` tensor of class indices, or None for unlabelled data.
        meta: per-item metadata, ``column -> list`` of length N. Always has ``id``
            (unique per item; filled with ``0..N-1`` when not given) and, when
            labels exist, ``label`` (the same integers as :attr:`labels`). Loaders add
            ``path``, ``label_name``, ``group`` and any extra manifest columns.
        name, version, source: where the data came from; copied into the model card.
        label_names: class index -> human name (``label_names[3] == "cat"``), or None
            when the labels are their own names (e.g. digits 0..9).
        split: None for a whole dataset; for a part made by
            :func:`nearfar.data.train_test_split`, a dict saying which part and how it
            was made (``{"part": "test", "seed": 0, ...}``).
        extras: further per-item tensors, ``key -> (N, ...)`` (e.g. a caption's UTF-8
            bytes under ``"text"``), kept aligned by :meth:`subset` and hashed by
            :meth:`sha256`; the trainer carries each into every batch under its key.
    """

    images: Tensor
    labels: Tensor | None = None
    meta: dict[str, list[Any]] = field(default_factory=dict)
    name: str = "unnamed"
    version: str = "1"
    source: str = ""
    label_names: list[str] | None = None
    split: dict[str, Any] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, Tensor):
            raise ValueError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(
                f"images: expected a 4-D tensor (N, C, H, W), got shape {_shape(images)}"
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(
                f"images: expected dtype uint8 (0..255) or floating point (0..1), "
                f"got {images.dtype}"
            )
        n = images.shape[0]
        if self.labels is not None:
            labels = self.labels
            if not isinstance(labels, Tensor):
                labels = torch.as_tensor(labels)
            if labels.ndim != 1 or labels.shape[0] != n:
                raise ValueError(f"labels: expected shape ({n},) like images, got {_shape(labels)}")
            if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
                raise ValueError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
            self.labels = labels.to(torch.int64)
        meta = {k: list(v) for k, v in self.meta.items()}
        for column, values in meta.items():
            if len(values) != n:
                raise ValueError(
                    f"meta[{column!r}]: expected {n} values (one per image), got {len(values)}"
                )
        if "id" not in meta:
            meta["id"] = list(range(n))
        else:
            seen: set[Any] = set()
            for value in meta["id"]:
                key = _hashable(value)
                if key in seen:
                    raise ValueError(
                        f"meta['id']: expected unique ids, got {value!r} more than once"
                    )
                seen.add(key)
        if self.labels is not None:
            meta["label"] = self.labels.tolist()
        self.meta = meta
        extras = dict(self.extras or {})
        for key, value in extras.items():
            if key in ("images", "labels", "index"):
                raise ValueError(f"extras[{key!r}]: the name is reserved for the batch; rename it")
            if not isinstance(value, Tensor) or value.ndim < 1 or value.shape[0] != n:
                got = _shape(value) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"extras[{key!r}]: expected a tensor with {n} rows (one per "
                                 f"image), got {got}")
        self.extras = extras

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(label_names)`` if named, else ``max(label) + 1``; 0 if none."""
        if self.labels is None:
            return 0
        if self.label_names is not None:
            return len(self.label_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def classes(self) -> list[str]:
        """Class names in index order (the label integers as strings when unnamed)."""
        if self.labels is None:
            return []
        if self.label_names is not None:
            return list(self.label_names)
        return [str(i) for i in range(self.num_classes)]

    def float_images(self, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """All images as a float tensor in [0, 1] (a copy), optionally on ``device``."""
        return to_float(self.images.to(device) if device is not None else self.images, dtype)

    # ---------------------------------------------------------------- subsets
    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> ImageDataset:
        """The items at ``indices`` (in that order), with labels and metadata kept aligned."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(
                f"indices: expected values in [0, {n}), got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        idx = idx % max(n, 1)
        positions = idx.tolist()
        meta = {k: [v[i] for i in positions] for k, v in self.meta.items()}
        return ImageDataset(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            meta=meta,
            name=self.name,
            version=self.version,
            source=self.source,
            label_names=None if self.label_names is None else list(self.label_names),
            split=None if self.split is None else dict(self.split),
            extras={k: v[idx] for k, v in self.extras.items()},
        )

    # ----------------------------------------------------------------- record
    def sha256(self) -> str:
        """Deterministic hex digest of the raw image bytes, their shape/dtype and the labels.

        Metadata, names and item order other than through the bytes do not enter, so
        the same pixels and labels in the same order always hash the same.
        """
        h = hashlib.sha256()
        images = self.images.detach().cpu().contiguous()
        h.update(f"images:{str(images.dtype)}:{tuple(images.shape)}".encode())
        h.update(images.numpy().tobytes())
        if self.labels is None:
            h.update(b"labels:none")
        else:
            labels = self.labels.detach().cpu().to(torch.int64).contiguous()
            h.update(f"labels:int64:{tuple(labels.shape)}".encode())
            h.update(labels.numpy().astype("<i8").tobytes())
        for key in sorted(self.extras):  # nothing is added when there are no extras
            value = self.extras[key].detach().cpu().contiguous()
            h.update(f"extras:{key}:{str(value.dtype)}:{tuple(value.shape)}".encode())
            h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Plain-data description for the model card."""
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "sha256": self.sha256(),
            "n_items": len(self),
            "image_shape": list(self.image_shape),
            "image_dtype": str(self.images.dtype).replace("torch.", ""),
            "n_classes": self.num_classes,
            "classes": self.classes,
            "meta_columns": sorted(self.meta),
        }
        if self.extras:
            out["extras"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace(
                "torch.", "")} for k, v in sorted(self.extras.items())}
        if self.labels is not None and len(self):
            counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
            out["class_counts"] = counts
        if self.split is not None:
            out["split"] = dict(self.split)
        return out

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        split = f", split={self.split.get('part')!r}" if self.split else ""
        return (
            f"ImageDataset(name={self.name!r}, version={self.version!r}, n={len(self)}, "
            f"image=({c}, {h}, {w}) {str(self.images.dtype).replace('torch.', '')}, "
            f"classes={self.num_classes}{split})"
        )


def to_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 0..255 -> float in [0, 1]; floating input is cast (a copy) unchanged in scale."""
    if images.dtype == torch.uint8:
        return images.to(dtype).div_(255.0)
    return images.to(dtype, copy=True)


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)
