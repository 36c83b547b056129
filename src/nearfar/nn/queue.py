"""A queue of past keys used as negatives (MoCo, He et al., 2020).

A ring buffer of K keys (K, D) with, optionally, the label and the item id of each key.
The order of use in a training step is what keeps a sample from being compared with
itself:

    negatives = queue.get()              # keys of *earlier* batches only
    loss = moco_loss(q, k, negatives)    # this batch's keys are the positives
    queue.enqueue(k, labels, ids)        # only now do they become negatives

``get()`` returns a detached copy, so no gradient reaches the queue and the in-place
``enqueue`` that follows does not disturb the backward pass. With ``ids`` the queue also
says which stored keys come from the same dataset items as the current batch (stale keys
of the same image from an earlier epoch), so a method can leave them out of the
denominator (:meth:`same_item_mask`).

Everything lives in buffers (keys, labels, ids, write position, fill count), so a
checkpoint restores the queue exactly.

Many processes (``torch.distributed``): ``enqueue(..., gather=True)`` appends every
rank's keys (with their labels and ids) in rank order, so all ranks hold the same queue,
the queue one process would hold after enqueuing the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar import distributed

UNKNOWN = -1  # label / id of a key that has none (random initial keys, unlabelled data)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


class Queue(nn.Module):
    """First-in first-out ring buffer of (K, D) keys, with optional labels and ids.

    Args:
        size: K, the number of keys kept.
        dim: D, the key size.
        track_labels: also keep each key's label (for the false-negative rate).
        track_ids: also keep each key's item id (to exclude an item's own stale keys).
        init: "random" fills the queue with random unit vectors (label / id -1), as the
            reference MoCo, so the loss has K negatives from the first step; "empty"
            starts with none (``get()`` then returns only what was enqueued).
        seed: seeds the random initial keys.
    """

    keys: Tensor
    key_labels: Tensor
    key_ids: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int, *, track_labels: bool = True,
                 track_ids: bool = True, init: str = "random", seed: int = 0) -> None:
        super().__init__()
        self.size = _positive_int(size, "size")
        self.dim = _positive_int(dim, "dim")
        if init not in ("random", "empty"):
            raise ValueError(f"init: expected 'random' or 'empty', got {init!r}")
        self.track_labels = bool(track_labels)
        self.track_ids = bool(track_ids)
        self.init = init
        if init == "random":
            g = torch.Generator().manual_seed(int(seed))
            keys = F.normalize(torch.randn(size, dim, generator=g), dim=1)
            count = size
        else:
            keys = torch.zeros(size, dim)
            count = 0
        self.register_buffer("keys", keys)
        self.register_buffer("key_labels", torch.full((size,), UNKNOWN, dtype=torch.long))
        self.register_buffer("key_ids", torch.full((size,), UNKNOWN, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))    # next write row
        self.register_buffer("count", torch.tensor(count, dtype=torch.long))  # filled rows

    def __len__(self) -> int:
        return int(self.count)

    # ------------------------------------------------------------------ reading
    def _filled(self) -> int:
        return int(self.count)

    def get(self) -> Tensor:
        """(n, D) the current negatives (n = K once full), detached copies.

        Row order is storage order, not age order; see :meth:`ordered` for that.
        """
        return self.keys[: self._filled()].detach().clone()

    def get_labels(self) -> Tensor | None:
        """(n,) labels of :meth:`get`'s rows (-1 unknown), or None when not tracked."""
        if not self.track_labels:
            return None
        return self.key_labels[: self._filled()].clone()

    def get_ids(self) -> Tensor | None:
        """(n,) item ids of :meth:`get`'s rows (-1 unknown), or None when not tracked."""
        if not self.track_ids:
            return None
        return self.key_ids[: self._filled()].clone()

    def ordered(self) -> Tensor:
        """(n, D) the stored keys from oldest to newest (for inspection and tests)."""
        n = self._filled()
        if n < self.size:
            return self.keys[:n].clone()
        p = int(self.ptr)
        return torch.cat([self.keys[p:], self.keys[:p]]).clone()

    def same_item_mask(self, ids: Tensor) -> Tensor | None:
        """(N, n) bool: stored key j comes from the same item as ``ids[i]``.

        None when ids are not tracked. Pass it as an exclusion mask so an item is never
        contrasted with a stale key of itself.
        """
        if not self.track_ids:
            return None
        stored = self.key_ids[: self._filled()]
        return (ids.to(stored.device)[:, None] == stored[None, :]) & (stored[None, :] >= 0)

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor | None = None,
                ids: Tensor | None = None, *, gather: bool = False) -> None:
        """Append (B, D) keys (oldest rows are overwritten once full), in row order.

        When B > K only the last K rows are kept. Labels / ids default to -1 (unknown).
        ``gather``: under ``torch.distributed``, append every rank's keys, labels and ids
        in rank order (every rank must pass the same B, and labels / ids on all ranks or
        on none), keeping the queues of all ranks identical; a no-op outside a process
        group.
        """
        if not isinstance(gather, bool):
            raise ValueError(f"gather: expected True or False, got {gather!r}")
        if not isinstance(keys, Tensor) or keys.ndim != 2 or keys.shape[1] != self.dim:
            got = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
            raise ValueError(f"keys: expected shape (B, {self.dim}), got {got}")
        b = keys.shape[0]
        extras = {}
        for name, value in (("labels", labels), ("ids", ids)):
            if value is not None:
                if not isinstance(value, Tensor) or value.shape != (b,):
                    got = tuple(value.shape) if isinstance(value, Tensor) else \
                        type(value).__name__
                    raise ValueError(f"{name}: expected shape ({b},) like keys, got {got}")
                extras[name] = value.detach().to(device=self.keys.device, dtype=torch.long)
        if gather and distributed.is_distributed():
            keys = distributed.all_gather_no_grad(keys.detach())
            extras = {k: distributed.all_gather_no_grad(v) for k, v in extras.items()}
            b = keys.shape[0]
        if b == 0:
            return
        keys = keys.detach().to(device=self.keys.device, dtype=self.keys.dtype)
        if b > self.size:  # only the newest K survive
            keys = keys[-self.size:]
            extras = {k: v[-self.size:] for k, v in extras.items()}
            b = self.size
        rows = (int(self.ptr) + torch.arange(b, device=self.keys.device)) % self.size
        self.keys[rows] = keys
        unknown = torch.full((b,), UNKNOWN, dtype=torch.long, device=self.keys.device)
        if self.track_labels:
            self.key_labels[rows] = extras.get("labels", unknown)
        if self.track_ids:
            self.key_ids[rows] = extras.get("ids", unknown)
        self.ptr.fill_((int(self.ptr) + b) % self.size)
        self.count.fill_(min(self.size, int(self.count) + b))

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, track_labels={self.track_labels}, "
                f"track_ids={self.track_ids}, init={self.init!r}")
