"""One validator for every loss: clear `ValueError`s naming the argument.

Messages follow the house style: ``<name>: expected <what>, got <what>``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_embeddings(x: object, name: str, *, min_rows: int = 1) -> Tensor:
    """A floating (N, D) tensor with N >= min_rows, D >= 1, all finite."""
    x = check_tensor(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (N, D), got shape {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one feature column, got shape {_shape(x)}")
    if x.shape[0] < min_rows:
        raise ValueError(
            f"{name}: expected at least {min_rows} rows (a batch of {min_rows} or more is "
            f"needed for negatives), got {x.shape[0]}"
        )
    check_finite(x, name)
    return x


def check_finite(x: Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf entries")


def check_like(x: Tensor, ref: Tensor, name: str, ref_name: str, *, same_rows: bool = True,
               same_cols: bool = True) -> None:
    """x must share ref's dtype and device, and (optionally) rows / columns."""
    if x.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} like {ref_name}, got {x.device}")
    if same_rows and x.shape[0] != ref.shape[0]:
        raise ValueError(
            f"{name}: expected {ref.shape[0]} rows like {ref_name}, got shape {_shape(x)}"
        )
    if same_cols and x.ndim >= 2 and ref.ndim >= 2 and x.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name}: expected {ref.shape[-1]} feature columns like {ref_name} "
            f"{_shape(ref)}, got shape {_shape(x)}"
        )


def check_pair(a: object, b: object, name_a: str, name_b: str, *, min_rows: int = 1
               ) -> tuple[Tensor, Tensor]:
    """Two (N, D) tensors of identical shape, dtype and device (row i of a pairs with row i
    of b)."""
    a = check_embeddings(a, name_a, min_rows=min_rows)
    b = check_embeddings(b, name_b, min_rows=min_rows)
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {_shape(a)} like {name_a}, got {_shape(b)}")
    check_like(b, a, name_b, name_a)
    return a, b


def check_positive_scalar(value: object, name: str) -> None:
    """A float or a 0-d tensor (possibly learnable) that is finite and > 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a scalar, got a tensor of shape {_shape(value)}")
        v = float(value.detach())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        raise ValueError(f"{name}: expected a number > 0, got {type(value).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {v}")


def check_nonnegative(value: object, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


def check_labels(labels: object, name: str, n: int, device: torch.device) -> Tensor:
    """An integer (n,) tensor on `device`."""
    labels = check_tensor(labels, name)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {_shape(labels)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name}: expected an integer tensor, got dtype {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"{name}: expected device {device}, got {labels.device}")
    return labels


def check_index(index: object, name: str, n: int, m: int, device: torch.device) -> Tensor:
    """An integer (n,) tensor of column indices in [0, m)."""
    index = check_labels(index, name, n, device)
    if n and (int(index.min()) < 0 or int(index.max()) >= m):
        raise ValueError(
            f"{name}: expected indices in [0, {m}), got values in "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    return index


def check_mask(mask: object, name: str, n: int, m: int, device: torch.device) -> Tensor:
    """A boolean (n, m) tensor on `device`."""
    mask = check_tensor(mask, name)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: expected a boolean tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (n, m):
        raise ValueError(f"{name}: expected shape ({n}, {m}), got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{name}: expected device {device}, got {mask.device}")
    return mask


def check_number(value: object, name: str) -> float:
    """A finite real number (bool refused)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def check_fraction(value: object, name: str, *, include_one: bool = False) -> float:
    """A finite number in [0, 1) (or [0, 1] with include_one)."""
    upper = "1]" if include_one else "1)"
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not math.isfinite(value) or value < 0 \
            or (value > 1 if include_one else value >= 1):
        raise ValueError(f"{name}: expected a number in [0, {upper}, got {value!r}")
    return float(value)


def check_tile_size(tile: object, name: str = "tile") -> None:
    """None (automatic), 0 (full computation) or a positive integer tile size."""
    if tile is None:
        return
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 0:
        raise ValueError(
            f"{name}: expected None (automatic), 0 (full) or a positive integer, got {tile!r}"
        )


def check_scalar_like(value: object, name: str, ref: Tensor, ref_name: str) -> Tensor:
    """A learnable scalar: a one-element tensor of shape () or (1,) with ref's dtype and device,
    finite; a Python number is taken as a constant of ref's dtype. Returns a 0-d tensor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        check_number(value, name)
        return torch.tensor(float(value), dtype=ref.dtype, device=ref.device)
    value = check_tensor(value, name)
    if value.numel() != 1 or value.ndim > 1:
        raise ValueError(f"{name}: expected a scalar of shape () or (1,), got {_shape(value)}")
    if value.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(
            f"{name}: expected device {ref.device} like {ref_name}, got {value.device}"
        )
    check_finite(value, name)
    return value.reshape(())


def check_view_logits(x: object, name: str, *, min_views: int = 1) -> Tensor:
    """A floating (V, N, K) tensor of per-view logits with V >= min_views, N >= 1, K >= 1,
    all finite."""
    x = check_tensor(x, name)
    if x.ndim != 3:
        raise ValueError(
            f"{name}: expected a 3-D tensor (views, N, K), got shape {_shape(x)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < min_views:
        raise ValueError(
            f"{name}: expected at least {min_views} views, got shape {_shape(x)}"
        )
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{name}: expected at least one row and one column, got {_shape(x)}")
    check_finite(x, name)
    return x


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """One of a few fixed strings."""
    if not isinstance(value, str) or value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def check_steps(x: object, name: str, *, min_rows: int = 1) -> Tensor:
    """A floating (B, K, D) tensor (B items, K steps, D features), B >= min_rows, all finite."""
    x = check_tensor(x, name)
    if x.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D tensor (B, K, D), got shape {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(
            f"{name}: expected at least one step and one feature, got shape {_shape(x)}"
        )
    if x.shape[0] < min_rows:
        raise ValueError(
            f"{name}: expected at least {min_rows} items (a batch of {min_rows} or more is "
            f"needed for negatives), got {x.shape[0]}"
        )
    check_finite(x, name)
    return x
