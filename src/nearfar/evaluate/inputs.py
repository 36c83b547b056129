"""Turning what a caller hands an evaluation protocol into checked tensors.

Embeddings and labels may come as torch tensors, numpy arrays or nested sequences.
Messages follow the house style: ``<name>: expected <what>, got <what>``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def _to_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        try:
            return torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: expected a rectangular array, got {err}") from None
    raise ValueError(
        f"{name}: expected a torch.Tensor, numpy array or sequence, got {type(x).__name__}"
    )


def as_embeddings(x: object, name: str, *, dim: int | None = None) -> Tensor:
    """A finite floating (N, D) tensor with N >= 1, returned as float32 on the CPU.

    Args:
        x: the embeddings.
        name: the argument's name, for error messages.
        dim: if given, the number of feature columns required (to match another set).
    """
    t = _to_tensor(x, name)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (N, D), got shape {_shape(t)}")
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16,
                                                 torch.int32, torch.int64)):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {t.dtype}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one row and one column, got shape "
                         f"{_shape(t)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} feature columns, got shape {_shape(t)}")
    t = t.to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf entries")
    return t


def as_labels(y: object, name: str, n: int) -> Tensor:
    """An integer (n,) tensor on the CPU (int64)."""
    t = _to_tensor(y, name)
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of {n} labels, got shape {_shape(t)}")
    if t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels (one per embedding row), got {t.shape[0]}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer class labels, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.int64)


def check_int(value: object, name: str, *, low: int, high: int | None = None) -> int:
    """An int in [low, high] (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {bound}, got {v}")
    return v


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number > 0, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {v}")
    return v


def check_nonnegative(value: object, name: str) -> float:
    """A finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number >= 0, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {v}")
    return v
