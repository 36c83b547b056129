"""Image folders: ``root/<class>/<image>`` (labelled) or ``root/<image>`` (unlabelled)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from nearfar.data.dataset import ImageDataset
from nearfar.data.images import IMAGE_SUFFIXES, is_image_file, read_images


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        p for p in pattern
        if p.is_file() and is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def load_image_folder(path: str | Path, *, image_size: int | Sequence[int] | None = None,
                      grayscale: bool | None = None, strict: bool = False,
                      name: str | None = None, version: str = "1") -> ImageDataset:
    """Load every image under a folder into an :class:`ImageDataset`.

    Two layouts:

    - class subfolders ``root/cat/1.png, root/dog/7.jpg``: label = index of the
      folder in sorted order, the folder name kept in ``label_names`` and in
      meta ``label_name``; images nested deeper inside a class folder belong to it.
    - flat ``root/1.png, root/2.png``: no labels.

    Meta columns: ``id`` and ``path`` (the file's path relative to ``root``, with ``/``),
    plus ``label``/``label_name`` for class folders.

    Args:
        path: the folder.
        image_size: (height, width) or an int for all images; None uses the first
            image's size (others are resized to it).
        grayscale: True for 1 channel, False for RGB, None to follow the first image.
        strict: raise on an unreadable image instead of skipping it with a warning.
        name, version: recorded on the dataset (name defaults to the folder's name).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder; check the path (load_image_folder)")
    if not root.is_dir():
        raise ValueError(
            f"{root}: expected a folder of images, got a file; for a .csv/.jsonl list of "
            f"images use nearfar.data.load_manifest"
        )
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    files: list[Path]
    labels: list[int] | None
    label_names: list[str] | None
    if class_dirs:
        files, labels = [], []
        label_names = [d.name for d in class_dirs]
        empty = []
        for index, d in enumerate(class_dirs):
            found = _images_under(d, recursive=True)
            if not found:
                empty.append(d.name)
            files += found
            labels += [index] * len(found)
        loose = _images_under(root, recursive=False)
        if loose:
            warnings.warn(
                f"{root}: ignored {len(loose)} image(s) directly in the folder (e.g. "
                f"{loose[0].name}); with class subfolders, every image must be inside one",
                UserWarning,
                stacklevel=2,
            )
        if empty and files:
            warnings.warn(
                f"{root}: class folder(s) with no images: {', '.join(empty)} (kept as classes "
                f"so label indices follow the sorted folder names)",
                UserWarning,
                stacklevel=2,
            )
    else:
        files = _images_under(root, recursive=False)
        labels, label_names = None, None
    if not files:
        raise ValueError(
            f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}); expected "
            f"class subfolders ({root.name}/cat/1.png) or image files directly in the folder"
        )
    images, kept = read_images(files, image_size=image_size, grayscale=grayscale,
                               strict=strict, where=str(root))
    rel = [files[i].relative_to(root).as_posix() for i in kept]
    meta: dict[str, list] = {"id": list(rel), "path": list(rel)}
    label_tensor = None
    if labels is not None and label_names is not None:
        kept_labels = [labels[i] for i in kept]
        label_tensor = torch.tensor(kept_labels, dtype=torch.int64)
        meta["label_name"] = [label_names[k] for k in kept_labels]
    return ImageDataset(
        images=images,
        labels=label_tensor,
        meta=meta,
        name=name or root.resolve().name,
        version=version,
        source=f"image folder {root.resolve()}",
        label_names=label_names,
    )
