"""Sharded tar input (the webdataset format) for data larger than memory.

A shard is a plain POSIX tar file whose members are grouped by key: the members of one
item are consecutive and share the name up to the first dot of the file name
(``000017.png``, ``000017.cls``, ``000017.json``), the extension saying what each holds:

* ``KEY.png``: the image (any format Pillow reads, under any image extension);
* ``KEY.cls``: the integer label as ASCII text (optional);
* ``KEY.json``: per-item metadata (optional); nearfar writes the dataset position under
  ``"index"`` and the item's ``meta`` columns (``id``, ``label_name``, ...).

Shards are named ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ... and addressed by a brace
pattern (``data-{000000..000009}.tar``), a folder (every ``*.tar`` in it) or a list.

This module reads them with the standard library's ``tarfile`` and Pillow, no new
dependency: the format is small (tar members grouped by key), and our reader needs the same
error and skip convention as the folder loader (``strict``), seeded shuffling that is
deterministic per (seed, epoch), and a rank x worker split we can test exactly. The
``webdataset`` package reads and writes the same files, so shards can be made or consumed
by either.

Two ways in:

* :func:`load_shards` reads shards fully into an :class:`ImageDataset` (when they fit);
* :class:`ShardStream` streams batches, ``{"images": uint8 (B, C, H, W), "labels": (B,)
  int64 or None, "index": (B,) int64}``, splitting shards across distributed ranks and
  DataLoader workers and shuffling with a buffer (use ``DataLoader(stream,
  batch_size=None, num_workers=k)``).

The ``Trainer`` holds its data in memory; to train on shards larger than memory, drive the
method directly (one step is what the Trainer does)::

    stream = ShardStream("shards/data-{000000..000099}.tar", batch_size=256,
                         shuffle_buffer=5000, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=4)
    for epoch in range(epochs):
        stream.set_epoch(epoch)              # before iterating: workers copy the stream
        for b in loader:
            batch = {**b, "images": b["images"].to(device).float().div_(255)}
            out = method.loss(batch, generator=views_generator)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from nearfar.data.dataset import ImageDataset
from nearfar.data.images import _GRAY_MODES, IMAGE_SUFFIXES, _to_array, parse_image_size

_SHOW_FIRST = 5
_IMAGE_EXTENSIONS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)


class ShardReadError(ValueError):
    """A shard, or an item in it, could not be read (raised with ``strict=True``; a
    missing shard file is always an error)."""


# ------------------------------------------------------------------------------ names

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """All names a brace pattern stands for, in order.

    ``{000000..000003}`` is a numeric range (inclusive; zero padding follows the width of
    the first bound), ``{a,b}`` a list; several braces multiply out left to right:
    ``"s-{0..1}-{x,y}.tar"`` -> ``s-0-x.tar, s-0-y.tar, s-1-x.tar, s-1-y.tar``.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"pattern: expected a string, got {type(pattern).__name__}")
    parts: list[list[str]] = []
    pos = 0
    for m in _BRACE.finditer(pattern):
        parts.append([pattern[pos:m.start()]])
        parts.append(_expand_one(m.group(1), pattern))
        pos = m.end()
    rest = pattern[pos:]
    if "{" in rest or "}" in rest or any("{" in p[0] or "}" in p[0] for p in parts[::2]):
        raise ValueError(f"pattern: unbalanced or nested braces in {pattern!r}; expected "
                         f"e.g. 'data-{{000000..000009}}.tar'")
    parts.append([rest])
    return ["".join(p) for p in itertools.product(*parts)]


def _expand_one(body: str, pattern: str) -> list[str]:
    m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise ValueError(f"pattern: range {{{body}}} in {pattern!r} runs backwards; "
                             f"write {{{m.group(2)}..{m.group(1)}}}")
        width = len(m.group(1))
        return [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    if "," in body:
        return body.split(",")
    raise ValueError(f"pattern: cannot expand {{{body}}} in {pattern!r}; expected a range "
                     f"{{000..009}} or a list {{a,b}}")


def shard_paths(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files ``shards`` names: a brace pattern, a folder (its ``*.tar`` files,
    sorted), one file, or a list of files. Every file must exist."""
    if isinstance(shards, (str, os.PathLike)):
        text = os.fspath(shards)
        folder = Path(text).expanduser()
        if "{" not in text and folder.is_dir():
            paths = sorted(folder.glob("*.tar"))
            if not paths:
                raise ValueError(f"{folder}: no .tar shards in this folder; write some with "
                                 f"nearfar.data.write_shards")
            return paths
        paths = [Path(p).expanduser() for p in expand_braces(text)]
    else:
        paths = [Path(p).expanduser() for p in shards]
    if not paths:
        raise ValueError("shards: expected a pattern, a folder or at least one shard path, "
                         "got none")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{missing[0]}: no such shard{more} (of {len(paths)} named); "
                                f"check the path or pattern")
    return paths


# ------------------------------------------------------------------------------ writing

def _png_bytes(image: Tensor) -> bytes:
    arr = image.numpy()
    img = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else \
        Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644   # reproducible bytes
    tf.addfile(info, io.BytesIO(data))


def write_shards(dataset: ImageDataset, out_dir: str | os.PathLike, items_per_shard: int = 1000,
                 *, prefix: str = "data") -> list[Path]:
    """Write a dataset as webdataset-format tar shards, in dataset order.

    Each item becomes ``KEY.cls`` (when the dataset has labels), ``KEY.json`` (its position
    under ``"index"`` and its meta columns that JSON can hold; other columns are left out)
    and ``KEY.png``, with KEY
    the zero-padded position. Each shard is written under a temporary name and renamed, so
    a shard that exists is complete.

    Args:
        dataset: uint8 images with 1 or 3 channels (float images are scaled from [0, 1]).
        out_dir: created if missing.
        items_per_shard: items per tar file (>= 1); the last shard may hold fewer.
        prefix: shards are named ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ...

    Returns:
        The shard paths, in order.
    """
    if not isinstance(dataset, ImageDataset):
        raise ValueError(f"dataset: expected an ImageDataset, got {type(dataset).__name__}")
    if isinstance(items_per_shard, bool) or not isinstance(items_per_shard, int) \
            or items_per_shard < 1:
        raise ValueError(f"items_per_shard: expected an integer >= 1, got {items_per_shard!r}")
    if not prefix or "/" in prefix or "{" in prefix:
        raise ValueError(f"prefix: expected a plain file-name prefix, got {prefix!r}")
    channels = dataset.images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"dataset: PNG shards hold 1- or 3-channel images, got {channels} "
                         f"channels")
    images = dataset.images
    if images.is_floating_point():
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    width = max(6, len(str(n - 1)))
    columns = {k: v for k, v in dataset.meta.items() if _jsonable(v)}
    labels = None if dataset.labels is None else dataset.labels.tolist()
    paths = []
    for s, start in enumerate(range(0, n, items_per_shard)):
        path = out / f"{prefix}-{s:06d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(start, min(n, start + items_per_shard)):
                key = f"{i:0{width}d}"
                if labels is not None:
                    _add(tf, f"{key}.cls", str(int(labels[i])).encode())
                record = {"index": i, **{k: v[i] for k, v in columns.items()}}
                _add(tf, f"{key}.json", json.dumps(record).encode())
                _add(tf, f"{key}.png", _png_bytes(images[i]))
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _jsonable(values: list[Any]) -> bool:
    """Whether a meta column can travel in the items' JSON records (else it is left out)."""
    try:
        json.dumps(values)
        return True
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------ reading

def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) the webdataset way: the key runs to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _raw_items(path: Path) -> Iterator[tuple[str, dict[str, bytes]] | ShardReadError]:
    """(key, {extension: bytes}) per item of one shard, in order. A damaged or truncated tar
    (no end-of-archive marker where the members stop) yields one ShardReadError after the
    complete items and stops; the item being read when the damage showed is dropped, as it
    may be incomplete."""
    key, members = None, {}
    damage = None
    try:
        with tarfile.open(path, mode="r:*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                k, ext = _split_name(info.name)
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                f = tf.extractfile(info)
                members[ext] = f.read() if f is not None else b""
            # tarfile stops quietly at a cut-off header; a whole tar ends in 2 zero blocks
            tf.fileobj.seek(tf.offset)
            if tf.fileobj.read(1024) != bytes(1024):
                damage = "no end-of-archive marker: truncated"
    except (tarfile.TarError, OSError, EOFError) as exc:
        damage = f"{type(exc).__name__}: {exc}"
    if damage is not None:
        after = "at the start" if key is None else f"in or after item {key!r}"
        yield ShardReadError(f"{path}: damaged tar {after} ({damage}); rewrite the shard")
        return
    if key is not None:
        yield key, members


def _decode(path: Path, key: str, members: dict[str, bytes], grayscale: bool | None,
            size: tuple[int, int] | None) -> tuple[np.ndarray, int | None, dict[str, Any]]:
    """(uint8 (C, H, W), label or None, json record) of one item; raises ShardReadError."""
    ext = next((e for e in _IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise ShardReadError(f"{path}: item {key!r} has no image member (found "
                             f"{', '.join(sorted(members)) or 'nothing'}; expected {key}.png)")
    try:
        with Image.open(io.BytesIO(members[ext])) as img:
            img.load()
            img = img.copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
            Image.DecompressionBombError) as exc:
        raise ShardReadError(f"{path}: cannot decode {key}.{ext} ({type(exc).__name__}: "
                             f"{exc})") from None
    if grayscale is None:
        grayscale = img.mode in _GRAY_MODES
    if size is None:
        size = (img.height, img.width)
    label = None
    if "cls" in members:
        try:
            label = int(members["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise ShardReadError(f"{path}: {key}.cls is not an integer label "
                                 f"({members['cls'][:20]!r})") from None
    record: dict[str, Any] = {}
    if "json" in members:
        try:
            record = json.loads(members["json"])
        except (UnicodeDecodeError, ValueError) as exc:
            raise ShardReadError(f"{path}: {key}.json is not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ShardReadError(f"{path}: {key}.json: expected an object, got "
                                 f"{type(record).__name__}")
    return _to_array(img, grayscale, size), label, record


class _Skips:
    """Counts skipped items and warns once, like the folder loader."""

    def __init__(self, strict: bool, where: str) -> None:
        self.strict, self.where, self.reasons = strict, where, []

    def __call__(self, err: ShardReadError) -> None:
        if self.strict:
            raise ShardReadError(f"{err}; or pass strict=False to skip what cannot be read, "
                                 f"with a warning") from None
        self.reasons.append(str(err))

    def warn(self, total: int) -> None:
        if not self.reasons:
            return
        shown = "; ".join(self.reasons[:_SHOW_FIRST])
        more = f"; and {len(self.reasons) - _SHOW_FIRST} more" if \
            len(self.reasons) > _SHOW_FIRST else ""
        warnings.warn(f"skipped {len(self.reasons)} unreadable item(s) or damaged shard "
                      f"tail(s) ({total} item(s) read) in {self.where}: {shown}{more}. Pass "
                      f"strict=True to stop at the first one instead.", UserWarning,
                      stacklevel=3)


def _items(paths: Sequence[Path], skips: _Skips, grayscale: bool | None,
           size: tuple[int, int] | None) -> Iterator[tuple[np.ndarray, int | None, int, dict]]:
    """(image, label, index, record) of every readable item of ``paths``, in order; the
    first readable image fixes grayscale and size when they are None."""
    for path in paths:
        for raw in _raw_items(path):
            if isinstance(raw, ShardReadError):
                skips(raw)
                continue
            try:
                arr, label, record = _decode(path, raw[0], raw[1], grayscale, size)
            except ShardReadError as err:
                skips(err)
                continue
            grayscale = arr.shape[0] == 1
            size = (arr.shape[1], arr.shape[2])
            index = record.get("index")
            yield arr, label, int(index) if isinstance(index, int) else -1, \
                {"key": raw[0], **record}


def load_shards(shards: str | os.PathLike | Sequence[str | os.PathLike], *,
                image_size: int | Sequence[int] | None = None, grayscale: bool | None = None,
                strict: bool = False, name: str | None = None) -> ImageDataset:
    """Read shards fully, in order, into an :class:`ImageDataset` (for data that fits).

    Labels come from ``.cls`` members (all items need one, else the dataset is unlabelled
    with a warning); meta columns from the ``.json`` members (``id`` from the record, else
    the item's key). ``image_size`` / ``grayscale`` as in
    :func:`nearfar.data.load_image_folder`; ``strict`` raises :class:`ShardReadError` on the
    first unreadable item instead of skipping it with a warning (a missing shard is always
    an error).
    """
    paths = shard_paths(shards)
    where = os.fspath(shards) if isinstance(shards, (str, os.PathLike)) else \
        f"{len(paths)} shards"
    skips = _Skips(strict, where)
    arrays, labels, records = [], [], []
    for arr, label, _, record in _items(paths, skips, grayscale,
                                        parse_image_size(image_size)):
        arrays.append(arr)
        labels.append(label)
        records.append(record)
    skips.warn(len(arrays))
    if not arrays:
        raise ShardReadError(f"{where}: no readable items in {len(paths)} shard(s)")
    label_tensor = None
    if all(v is not None for v in labels):
        label_tensor = torch.tensor(labels, dtype=torch.int64)
    elif any(v is not None for v in labels):
        warnings.warn(f"{where}: {sum(v is None for v in labels)} of {len(labels)} items have "
                      f"no .cls label; loading without labels", UserWarning, stacklevel=2)
    columns = sorted({k for r in records for k in r} - {"index", "label"})
    meta = {k: [r.get(k) for r in records] for k in columns}
    if "id" not in meta or len(set(map(_hashable, meta["id"]))) != len(records):
        meta["id"] = [r["key"] for r in records]
    names = None
    if label_tensor is not None and "label_name" in meta and None not in meta["label_name"]:
        by_label = dict(zip(label_tensor.tolist(), meta["label_name"]))
        if sorted(by_label) == list(range(len(by_label))):
            names = [by_label[k] for k in range(len(by_label))]
    return ImageDataset(images=torch.from_numpy(np.stack(arrays)), labels=label_tensor,
                        meta=meta, name=name or Path(paths[0]).name.rsplit("-", 1)[0],
                        source=f"tar shards {where}", label_names=names)


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(torch.utils.data.IterableDataset):
    """Batches streamed from tar shards, split across ranks and DataLoader workers.

    Per epoch: the shard list is shuffled with ``(seed, epoch)`` (the same order on every
    rank), rank r of R takes shards ``r, r + R, ...``, and worker w of W within a rank takes
    every W-th of those; so with at least R x W shards every item is read exactly once per
    epoch across all of them (fewer shards leave some readers idle, with a warning). Each
    reader decodes its items in shard order and passes them through a shuffle buffer of
    ``shuffle_buffer`` items (seeded by seed, epoch, rank and worker: deterministic), then
    cuts batches.

    Args:
        shards: a brace pattern, a folder of ``*.tar`` or a list of shard paths.
        batch_size: items per batch (>= 1).
        shuffle_buffer: items held for shuffling (0: stream order, no shuffling; larger
            mixes more, memory of that many decoded images).
        shuffle_shards: shuffle the shard order per epoch (ignored without shuffling).
        seed: seeds every shuffle; call :meth:`set_epoch` each epoch for a new order.
        rank, world_size: this process's share; None takes them from ``torch.distributed``
            when it is initialised (else 0 of 1).
        drop_last: drop each reader's last short batch.
        image_size, grayscale: as in :func:`load_shards`; None follows each reader's first
            image, and an image of another size is resized to it.
        strict: raise :class:`ShardReadError` on the first unreadable item or damaged
            shard instead of skipping it; skips are counted in :attr:`skipped` (in this
            process) and reported in a warning at the end of each reader's pass.

    Yields:
        ``{"images": uint8 (B, C, H, W), "labels": (B,) int64 or None (None when no item
        of the batch has a ``.cls``; -1 for an item without one), "index": (B,) int64}``,
        ``index`` being the ``"index"`` of the item's JSON record (the position in the
        dataset :func:`write_shards` wrote), else -1.
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *,
                 batch_size: int, shuffle_buffer: int = 1000, shuffle_shards: bool = True,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, image_size: int | Sequence[int] | None = None,
                 grayscale: bool | None = None, strict: bool = False) -> None:
        super().__init__()
        self.paths = shard_paths(shards)
        self.where = os.fspath(shards) if isinstance(shards, (str, os.PathLike)) else \
            f"{len(self.paths)} shards"
        for arg, value, low in (("batch_size", batch_size, 1),
                                ("shuffle_buffer", shuffle_buffer, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}: expected an integer >= {low}, got {value!r}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"rank, world_size: give both or neither, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        if world_size is not None and not (isinstance(world_size, int) and world_size >= 1
                                           and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank: expected 0 <= rank < world_size, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.shuffle_shards, self.seed = bool(shuffle_shards), int(seed)
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.strict = bool(drop_last), bool(strict)
        self.size = parse_image_size(image_size)
        self.grayscale = grayscale
        self.epoch = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """A new shard order and shuffle for this epoch (call before iterating)."""
        self.epoch = int(epoch)

    def reader_shards(self, worker: int = 0, num_workers: int = 1) -> list[Path]:
        """The shards one reader (this rank, worker ``worker`` of ``num_workers``) reads
        this epoch, in reading order."""
        rank, world = (self.rank, self.world_size) if self.world_size is not None \
            else _dist_rank_world()
        order = list(range(len(self.paths)))
        if self.shuffle_shards and self.shuffle_buffer > 0:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        mine = order[rank::world][worker::num_workers]
        return [self.paths[i] for i in mine]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        paths = self.reader_shards(worker, workers)
        rank = self.rank if self.world_size is not None else _dist_rank_world()[0]
        readers = (self.world_size or _dist_rank_world()[1]) * workers
        if not paths and len(self.paths) < readers:
            warnings.warn(f"{self.where}: {len(self.paths)} shard(s) for {readers} readers "
                          f"(ranks x workers); rank {rank} worker {worker} has none. Write "
                          f"more, smaller shards", UserWarning, stacklevel=2)
        skips = _Skips(self.strict, self.where)
        items = _items(paths, skips, self.grayscale, self.size)
        if self.shuffle_buffer > 0:
            g = torch.Generator().manual_seed(
                ((self.seed * 1_000_003 + self.epoch) * 1009 + rank) * 1009 + worker)
            items = _shuffled(items, self.shuffle_buffer, g)
        batch: list[tuple[np.ndarray, int | None, int, dict]] = []
        count = 0
        try:
            for item in items:
                batch.append(item)
                count += 1
                if len(batch) == self.batch_size:
                    yield _collate(batch)
                    batch = []
            if batch and not self.drop_last:
                yield _collate(batch)
        finally:
            self.skipped += len(skips.reasons)
            skips.warn(count)


def _shuffled(items: Iterator[Any], size: int, g: torch.Generator) -> Iterator[Any]:
    """A shuffle buffer: fill to ``size``, then emit a random held item per new one."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(torch.randint(size, (1,), generator=g))
        buf[j], item = item, buf[j]
        yield item
    while buf:
        j = int(torch.randint(len(buf), (1,), generator=g))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def _collate(batch: list[tuple[np.ndarray, int | None, int, dict]]) -> dict[str, Any]:
    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    labels = [b[1] for b in batch]
    label_tensor = None
    if any(v is not None for v in labels):
        label_tensor = torch.tensor([-1 if v is None else v for v in labels], dtype=torch.int64)
    index = torch.tensor([b[2] for b in batch], dtype=torch.int64)
    return {"images": images, "labels": label_tensor, "index": index}
