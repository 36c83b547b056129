"""Pipelines of view ops, positive pairs, and building both from plain data (TOML recipes)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from nearfar.views.base import ViewOp, as_float_batch
from nearfar.views.blur import GaussianBlur
from nearfar.views.color import ColorJitter, RandomGrayscale, Solarize
from nearfar.views.geometry import (
    GeometricOp,
    HorizontalFlip,
    RandomAffine,
    RandomResizedCrop,
    apply_geometry,
)
from nearfar.views.noise import GaussianNoise

OPS: dict[str, type[ViewOp]] = {
    cls.name: cls
    for cls in (RandomResizedCrop, HorizontalFlip, RandomAffine, ColorJitter, RandomGrayscale,
                GaussianBlur, Solarize, GaussianNoise)
}
"""Op name -> class, for :func:`build_pipeline`."""

ALIASES: dict[str, str] = {
    "crop": "random_resized_crop",
    "flip": "horizontal_flip",
    "affine": "random_affine",
    "grayscale": "random_grayscale",
    "blur": "gaussian_blur",
    "noise": "gaussian_noise",
}
"""Short names accepted by :func:`build_pipeline`; ``describe()`` always gives the full name."""


def register_op(cls: type[ViewOp], *, overwrite: bool = False) -> type[ViewOp]:
    """Make a custom :class:`ViewOp` subclass buildable by name (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, ViewOp) and cls.name):
        raise ValueError(f"cls: expected a ViewOp subclass with a `name`, got {cls!r}")
    if (cls.name in OPS or cls.name in ALIASES) and not overwrite:
        raise ValueError(f"view op {cls.name!r} is already registered; pass overwrite=True")
    OPS[cls.name] = cls
    return cls


class Compose:
    """Apply view ops in order; consecutive geometric ops are fused into one resampling.

    ``Compose(ops)(x, generator)`` -> augmented batch; ``describe()`` -> list of the
    ops' ``describe()`` dicts (the model card's "positive construction").
    """

    def __init__(self, ops: Sequence[ViewOp]):
        ops = list(ops)
        for i, op in enumerate(ops):
            if not isinstance(op, ViewOp):
                raise ValueError(
                    f"ops[{i}]: expected a view op (e.g. RandomResizedCrop(...)), got "
                    f"{type(op).__name__}; build from dicts with nearfar.views.build_pipeline"
                )
        self.ops = ops

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = as_float_batch(x, "x")
        run: list[GeometricOp] = []
        for op in self.ops:
            if isinstance(op, GeometricOp):
                run.append(op)
                continue
            if run:
                x = apply_geometry(x, run, generator)
                run = []
            x = op(x, generator)
        if run:
            x = apply_geometry(x, run, generator)
        return x

    def describe(self) -> list[dict[str, Any]]:
        return [op.describe() for op in self.ops]

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[ViewOp]:
        return iter(self.ops)

    def __getitem__(self, i: int) -> ViewOp:
        return self.ops[i]

    def __repr__(self) -> str:
        inner = ",\n".join(f"    {op!r}" for op in self.ops)
        return f"Compose([\n{inner}\n])" if self.ops else "Compose([])"


def _as_pipeline(value: Compose | ViewOp | Sequence[Any], where: str) -> Compose:
    if isinstance(value, Compose):
        return value
    if isinstance(value, ViewOp):
        return Compose([value])
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return build_pipeline(value, where=where)
    raise ValueError(
        f"{where}: expected a Compose, a view op or a list of op dicts, got {type(value).__name__}"
    )


class TwoViews:
    """The SimCLR positive pair: two independently augmented views of every image.

    ``TwoViews(pipeline)`` uses one pipeline for both views (each view draws its own
    parameters); ``TwoViews(view_1, view_2)`` uses one per view (e.g. BYOL's
    asymmetric blur/solarize). Each argument may be a :class:`Compose`, an op, or a
    list of op dicts.

    ``views(x, generator) -> (x1, x2)``, both (B, C, H', W') float in [0, 1]; row i
    of ``x1`` and row i of ``x2`` are the positive pair. A shared pipeline runs once
    on the batch stacked twice (``cat([x, x])``), which is faster on a GPU.
    """

    def __init__(self, view_1: Compose | ViewOp | Sequence[Any],
                 view_2: Compose | ViewOp | Sequence[Any] | None = None):
        self.view_1 = _as_pipeline(view_1, "view_1")
        self.view_2 = self.view_1 if view_2 is None else _as_pipeline(view_2, "view_2")

    @property
    def shared(self) -> bool:
        return self.view_2 is self.view_1

    def __call__(self, x: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        x = as_float_batch(x, "x")
        if self.shared:
            # one pass over the doubled batch: half the kernel launches, and every row
            # (so each of the two copies of an image) still draws its own parameters
            both = self.view_1(torch.cat([x, x]), generator)
            return both[: len(x)], both[len(x):]
        return self.view_1(x, generator), self.view_2(x, generator)

    def describe(self) -> dict[str, Any]:
        """``{"name": "two_views", "shared_pipeline": bool, "view_1": [...], "view_2": [...]}``."""
        return {
            "name": "two_views",
            "description": "two independently augmented views of each item form a positive pair",
            "shared_pipeline": self.shared,
            "view_1": self.view_1.describe(),
            "view_2": self.view_2.describe(),
        }

    def __repr__(self) -> str:
        if self.shared:
            return f"TwoViews({self.view_1!r})"
        return f"TwoViews(view_1={self.view_1!r}, view_2={self.view_2!r})"


def _allowed(cls: type[ViewOp]) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [n for n in sig.parameters if n != "self"]


def build_op(spec: Mapping[str, Any], *, where: str = "op") -> ViewOp:
    """One op from ``{"name": ..., <parameters>}``; errors name the op and parameter."""
    if isinstance(spec, ViewOp):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where}: expected a table like {{name = \"gaussian_noise\", std = 0.05}}, got "
            f"{type(spec).__name__} {spec!r}"
        )
    if "name" not in spec:
        raise ValueError(
            f"{where}: missing 'name'; expected one of {', '.join(sorted(OPS))}"
        )
    raw_name = spec["name"]
    name = ALIASES.get(raw_name, raw_name) if isinstance(raw_name, str) else raw_name
    if name not in OPS:
        short = ", ".join(f"{a} ({n})" for a, n in sorted(ALIASES.items()))
        raise ValueError(
            f"{where}: unknown view op {raw_name!r}; expected one of "
            f"{', '.join(sorted(OPS))} (short names: {short})"
        )
    cls = OPS[name]
    allowed = _allowed(cls)
    params = {k: v for k, v in spec.items() if k != "name"}
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise ValueError(
            f"{where} ({name}): unknown parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; allowed: {', '.join(allowed)}"
        )
    try:
        return cls(**params)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def build_pipeline(specs: Sequence[Mapping[str, Any] | ViewOp], *,
                   where: str = "views") -> Compose:
    """A :class:`Compose` from a list of op dicts (the shape of a TOML array of tables).

    ``build_pipeline([{"name": "random_resized_crop", "scale": [0.4, 1.0]},
    {"name": "noise", "std": 0.05}])``. ``build_pipeline(p.describe())`` rebuilds ``p``.
    Names: see :data:`OPS` and :data:`ALIASES`.
    """
    if isinstance(specs, Compose):
        return specs
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(
            f"{where}: expected a list of op tables like [{{name = \"random_resized_crop\"}}, "
            f"...], got {type(specs).__name__}"
        )
    return Compose([build_op(spec, where=f"{where}[{i}]") for i, spec in enumerate(specs)])


def build_two_views(spec: Sequence[Any] | Mapping[str, Any], *,
                    where: str = "views") -> TwoViews:
    """A :class:`TwoViews` from plain data.

    Either a list of op dicts (one pipeline for both views), or a mapping with
    ``view_1`` and optionally ``view_2`` lists (as ``TwoViews.describe()`` gives).
    """
    if isinstance(spec, Mapping):
        extra = set(spec) - {"name", "description", "shared_pipeline", "view_1", "view_2"}
        if "view_1" not in spec or extra:
            raise ValueError(
                f"{where}: expected a list of op tables, or a table with 'view_1' (and "
                f"optionally 'view_2') lists; got keys {', '.join(map(repr, spec)) or 'none'}"
            )
        view_1 = build_pipeline(spec["view_1"], where=f"{where}.view_1")
        if spec.get("shared_pipeline") or spec.get("view_2") is None:
            return TwoViews(view_1)
        return TwoViews(view_1, build_pipeline(spec["view_2"], where=f"{where}.view_2"))
    return TwoViews(build_pipeline(spec, where=where))
