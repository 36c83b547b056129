"""Deterministic, stratified train/test split."""

from __future__ import annotations

import torch

from nearfar.data.dataset import ImageDataset


def _test_count(test_size: int | float, n: int) -> int:
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise ValueError(
            f"test_size: expected a count (int) or a fraction in (0, 1), got {test_size!r}"
        )
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size: expected a fraction in (0, 1), got {test_size}")
        count = int(round(test_size * n))
    else:
        count = int(test_size)
    if not 0 < count < n:
        raise ValueError(
            f"test_size: expected between 1 and {n - 1} test items for a dataset of {n}, "
            f"got {count}"
        )
    return count


def split_indices(labels: torch.Tensor | None, n: int, test_size: int | float = 0.2, *,
                  seed: int = 0, stratify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) index tensors, each sorted ascending; see :func:`train_test_split`."""
    n_test = _test_count(test_size, n)
    g = torch.Generator().manual_seed(int(seed))
    if labels is None or not stratify:
        perm = torch.randperm(n, generator=g)
        test = perm[:n_test]
    else:
        classes, counts = torch.unique(labels, return_counts=True)
        # Largest-remainder allocation: exact total, each class within 1 of proportional.
        quota = counts.double() * n_test / n
        alloc = quota.floor().long()
        remainder = n_test - int(alloc.sum())
        if remainder:
            frac = quota - alloc.double()
            # ties broken by class order, deterministically
            order = sorted(range(len(classes)), key=lambda i: (-float(frac[i]), i))
            for i in order[:remainder]:
                alloc[i] += 1
        parts = []
        for cls, k in zip(classes.tolist(), alloc.tolist()):
            members = torch.nonzero(labels == cls).flatten()
            perm = torch.randperm(len(members), generator=g)
            parts.append(members[perm[:k]])
        test = torch.cat(parts)
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[test] = True
    all_idx = torch.arange(n)
    return all_idx[~is_test], all_idx[is_test]


def train_test_split(ds: ImageDataset, test_size: int | float = 0.2, *, seed: int = 0,
                     stratify: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """Split ``ds`` into (train, test), deterministically for a given ``seed``.

    Args:
        ds: the dataset to split.
        test_size: a count (``1000``) or a fraction in (0, 1) (``0.2``, rounded).
            For MNIST-5k the default gives 4,000 / 1,000 with 100 test items per class.
        seed: the split is a pure function of (labels, test_size, seed).
        stratify: keep class proportions (largest-remainder rounding, so each class
            gets within one item of its proportional share); ignored without labels.

    Returns:
        (train, test), each keeping the original item order, with aligned metadata
        and ``split`` set to ``{"part", "seed", "test_size", "stratified", "parent_sha256"}``.
    """
    n = len(ds)
    train_idx, test_idx = split_indices(ds.labels, n, test_size, seed=seed, stratify=stratify)
    record = {
        "seed": int(seed),
        "test_size": len(test_idx),
        "train_size": len(train_idx),
        "stratified": bool(stratify and ds.labels is not None),
        "parent_sha256": ds.sha256(),
        "parent_n_items": n,
    }
    train = ds.subset(train_idx)
    test = ds.subset(test_idx)
    train.split = {"part": "train", **record}
    test.split = {"part": "test", **record}
    return train, test


__all__ = ["split_indices", "train_test_split"]
