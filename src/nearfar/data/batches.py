"""Fast, seedable, resumable batches from an in-memory :class:`ImageDataset`.

A batch is one index operation on the dataset's image tensor: no per-item Python.
Images travel to the device as uint8 (a quarter of the bytes) and become float in
[0, 1] there.

Exact resume: :class:`BatchLoader` keeps the state of its ``torch.Generator`` as it
was at the start of the current epoch plus the number of batches already handed
out. ``state_dict()`` returns that (the generator state is a uint8 tensor, storable
with safetensors; ``epoch``/``position``/``seed`` are ints); ``load_state_dict()``
restores it, redraws the same permutation and continues at the next batch, leaving
the generator exactly where an uninterrupted run would have it. For the plain
:func:`batches` function, save ``generator.get_state()`` *before* the epoch and pass
``start=<batches done>`` after ``generator.set_state(saved)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from nearfar.data.dataset import ImageDataset, to_float


class Batch(NamedTuple):
    """images: (B, C, H, W) float in [0, 1]; labels: (B,) int64 or None; indices: (B,) int64
    positions in the dataset (look up ``ds.meta[...]`` with them)."""

    images: Tensor
    labels: Tensor | None
    indices: Tensor


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    return batch_size


def num_batches(n: int, batch_size: int, *, drop_last: bool = True) -> int:
    """How many batches an epoch over ``n`` items yields."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_indices(n: int, batch_size: int, *, shuffle: bool = True,
                  generator: torch.Generator | None = None, drop_last: bool = True,
                  start: int = 0) -> Iterator[Tensor]:
    """One epoch of (B,) int64 index tensors over ``range(n)``.

    With ``shuffle``, the order is ``torch.randperm(n, generator=generator)`` (one draw
    per epoch, on the CPU). ``start`` skips that many batches (for resuming).
    """
    batch_size = _check_batch_size(batch_size)
    if shuffle:
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                f"generator: expected a CPU torch.Generator for the batch order, got one on "
                f"{generator.device}"
            )
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    stop = num_batches(n, batch_size, drop_last=drop_last)
    for b in range(start, stop):
        yield order[b * batch_size:(b + 1) * batch_size]


def take(ds: ImageDataset, indices: Tensor, *, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32, non_blocking: bool = False) -> Batch:
    """The :class:`Batch` at ``indices``: images as float in [0, 1] on ``device``."""
    images = ds.images[indices]
    if device is not None:
        images = images.to(device, non_blocking=non_blocking)
    labels = None
    if ds.labels is not None:
        labels = ds.labels[indices]
        if device is not None:
            labels = labels.to(device, non_blocking=non_blocking)
    return Batch(to_float(images, dtype), labels, indices)


def batches(ds: ImageDataset, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | None = None, drop_last: bool = True,
            device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
            start: int = 0) -> Iterator[Batch]:
    """One epoch of :class:`Batch` es from ``ds``.

    Training: ``batches(ds, 256, generator=g)`` (shuffled, last partial batch dropped).
    Evaluation: ``batches(ds, 1024, shuffle=False, drop_last=False)``.
    """
    if len(ds) == 0:
        raise ValueError("ds: the dataset is empty; there is nothing to batch")
    for idx in batch_indices(len(ds), batch_size, shuffle=shuffle, generator=generator,
                             drop_last=drop_last, start=start):
        yield take(ds, idx, device=device, dtype=dtype)


class BatchLoader:
    """Repeatable epochs of shuffled batches, with an exactly resumable state.

    ``for batch in loader`` runs one epoch (or the rest of an interrupted one) and
    advances :attr:`epoch`. The order depends only on ``seed`` and the epoch number
    reached, so a run restored with :meth:`load_state_dict` sees the same batches.

    Example::

        loader = BatchLoader(train, 256, seed=0, device="cuda")
        for epoch in range(10):
            for batch in loader:
                ...
                if time_to_checkpoint:
                    save({"loader": loader.state_dict(), ...})
        # later
        loader.load_state_dict(saved["loader"])   # continues at the next batch
    """

    def __init__(self, ds: ImageDataset, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if len(ds) == 0:
            raise ValueError("ds: the dataset is empty; there is nothing to batch")
        self.ds = ds
        self.batch_size = _check_batch_size(batch_size)
        if num_batches(len(ds), self.batch_size, drop_last=drop_last) == 0:
            raise ValueError(
                f"batch_size: {batch_size} is larger than the dataset ({len(ds)} items) with "
                f"drop_last=True, so an epoch would have no batches; use a smaller batch_size"
            )
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = device
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 0
        self.position = 0  # batches already yielded in the current epoch
        self._epoch_start_state = self.generator.get_state()

    def __len__(self) -> int:
        """Batches per epoch."""
        return num_batches(len(self.ds), self.batch_size, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        self.generator.set_state(self._epoch_start_state)
        order = batch_indices(len(self.ds), self.batch_size, shuffle=self.shuffle,
                              generator=self.generator, drop_last=self.drop_last,
                              start=self.position)
        for idx in order:
            self.position += 1
            yield take(self.ds, idx, device=self.device, dtype=self.dtype)
        self.epoch += 1
        self.position = 0
        self._epoch_start_state = self.generator.get_state()

    def state_dict(self) -> dict[str, Any]:
        """{"seed", "epoch", "position", "generator_state" (uint8 CPU tensor), "batch_size",
        "n_items"} - everything needed to continue at the next batch."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "generator_state": self._epoch_start_state.clone(),
            "batch_size": self.batch_size,
            "n_items": len(self.ds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "position", "generator_state"):
            if key not in state:
                raise ValueError(f"state: missing {key!r}; expected a BatchLoader.state_dict()")
        if state.get("batch_size", self.batch_size) != self.batch_size or \
                state.get("n_items", len(self.ds)) != len(self.ds):
            raise ValueError(
                f"state: saved for batch_size={state.get('batch_size')} over "
                f"{state.get('n_items')} items, but this loader has batch_size="
                f"{self.batch_size} over {len(self.ds)}; resume with the same data and "
                f"batch size"
            )
        gen_state = state["generator_state"]
        if not isinstance(gen_state, Tensor):
            gen_state = torch.as_tensor(gen_state, dtype=torch.uint8)
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._epoch_start_state = gen_state.to(torch.uint8).cpu().clone()
        self.generator.set_state(self._epoch_start_state)
