"""What every view op shares: the call contract, randomness, parameter checks, describe().

The contract: an op takes a float batch ``x`` of shape (B, C, H, W) with values in
[0, 1] (a uint8 batch is accepted and divided by 255) and an optional
``torch.Generator``, and returns a new batch in which every image got its own
random parameters. Nothing loops over images in Python.

Randomness: parameters are drawn on the generator's device and moved to the
batch's device, so a CPU generator works with a CUDA batch (small per-image
parameter vectors cross the bus; per-pixel noise too, so for speed on a GPU pass
``torch.Generator(device="cuda")``). With ``generator=None`` torch's default
generator for the batch's device is used. The same generator state, batch and
device give the same output; CPU and CUDA streams differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def as_float_batch(x: object, where: str = "x") -> Tensor:
    """Check a (B, C, H, W) image batch; uint8 becomes float32 in [0, 1]."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{where}: expected a torch.Tensor batch, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"{where}: expected a 4-D image batch (B, C, H, W), got shape {_shape(x)}"
            + ("; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else "")
        )
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise ValueError(
            f"{where}: expected a float batch in [0, 1] (or uint8 0..255), got dtype {x.dtype}"
        )
    return x


# ---------------------------------------------------------------- randomness
def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def rand(shape: Sequence[int] | int, generator: torch.Generator | None,
         device: torch.device) -> Tensor:
    """U[0, 1) float32 of ``shape``, drawn from ``generator``, returned on ``device``."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    out = torch.rand(shape, generator=generator, device=_draw_device(generator, device))
    return out.to(device)


def randn(shape: Sequence[int] | int, generator: torch.Generator | None,
          device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    out = torch.randn(shape, generator=generator, device=_draw_device(generator, device),
                      dtype=dtype)
    return out.to(device)


def uniform(bounds: tuple[float, float], shape: Sequence[int] | int,
            generator: torch.Generator | None, device: torch.device) -> Tensor:
    lo, hi = bounds
    return rand(shape, generator, device) * (hi - lo) + lo


def coin(p: float, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) bool: which images the op is applied to."""
    return rand(n, generator, device) < p


# ------------------------------------------------------------ parameter checks
def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_probability(value: object, where: str) -> float:
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def check_number(value: object, where: str, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> float:
    ok = _is_number(value)
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        want = "a number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{where}: expected {want}, got {value!r}")
    return float(value)


def check_range(value: object, where: str, *,
                from_number: Callable[[float], tuple[float, float]] | None = None,
                low: float | None = None, high: float | None = None,
                low_open: bool = False) -> tuple[float, float]:
    """A [min, max] pair within bounds; a single number is expanded by ``from_number``.

    The message names the parameter, what is allowed and what was given.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{low:g} {'<' if low_open else '<='} min")
    bounds.append("min <= max")
    if high is not None:
        bounds.append(f"max <= {high:g}")
    want = ("a number or " if from_number else "") + "[min, max] with " + ", ".join(bounds)
    pair: tuple[Any, Any]
    if from_number is not None and _is_number(value):
        if float(value) < 0:
            raise ValueError(f"{where}: expected a number >= 0 or [min, max], got {value!r}")
        pair = from_number(float(value))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)):
        pair = (float(value[0]), float(value[1]))
    else:
        raise ValueError(f"{where}: expected {want}, got {value!r}")
    lo, hi = float(pair[0]), float(pair[1])
    bad = lo > hi
    if low is not None:
        bad = bad or (lo <= low if low_open else lo < low)
    if high is not None:
        bad = bad or hi > high
    if bad:
        raise ValueError(f"{where}: expected {want}, got {value!r}")
    return lo, hi


# ----------------------------------------------------------------------- ops
def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class ViewOp:
    """Base of every augmentation: ``op(x, generator) -> x'`` and ``op.describe()``.

    Subclasses set :attr:`name`, store their (checked) constructor arguments in
    ``self.params`` (so ``build_pipeline([op.describe()])`` rebuilds the same op),
    and implement :meth:`apply` on a checked float batch.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    @property
    def p(self) -> float:
        return float(self.params.get("p", 1.0))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = as_float_batch(x, f"{self.name} input")
        if self.p <= 0.0 or x.shape[0] == 0:
            return x
        return self.apply(x, generator)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., <every parameter>}`` as plain data (lists, not tuples)."""
        return {"name": self.name,
                **{k: _plain(v) for k, v in self.params.items() if v is not None}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_plain(v)!r}" for k, v in self.params.items() if v is not None)
        return f"{type(self).__name__}({args})"
