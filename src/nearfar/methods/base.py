"""The protocol every method follows, and what one training step returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class StepOutput:
    """What :meth:`Method.loss` returns for one batch.

    Attributes:
        loss: scalar tensor to minimise (attached to the graph).
        metrics: extra scalars to log, name -> float or 0-d tensor (tensors are
            turned into floats by the trainer only on logging steps, so a GPU is not
            synchronised every step).
        embeddings: (B, D) projections of one view, detached; the trainer's collapse
            guard watches their spread. None when a method has nothing to watch.
    """

    loss: Tensor
    metrics: dict[str, float | Tensor] = field(default_factory=dict)
    embeddings: Tensor | None = None


class Method(nn.Module):
    """A contrastive method: an encoder, whatever it trains through, and an objective.

    A batch is a dict with ``images`` float (B, C, H, W) in [0, 1] on the training
    device, ``labels`` (B,) int64 or None, and ``index`` (B,) int64 positions in the
    dataset.

    Subclasses implement :meth:`embed`, :meth:`loss` and :meth:`describe`; methods
    with schedules or momentum copies also override :meth:`after_step`.

    Attributes set by the trainer (plain attributes, not constructor arguments):
        batch_size: items per micro-batch, reported in ``describe()["negatives"]``.
        memory_format: layout the method should give its encoder's inputs
            (``torch.channels_last`` when the trainer runs channels-last).
    """

    name: str = "method"
    modality: str = "image"

    def __init__(self) -> None:
        super().__init__()
        self.batch_size: int | None = None
        self.memory_format: torch.memory_format = torch.contiguous_format

    def embed(self, x: Tensor) -> Tensor:
        """(B, D) features used downstream (the backbone output unless the head is kept)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`embed`, so a method can be handed to anything expecting a module."""
        return self.embed(x)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        """The objective on one batch; ``generator`` seeds the views (on the batch's device)."""
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step with progress in [0, 1] (EMA, queues, schedules)."""

    def describe(self) -> dict[str, Any]:
        """Plain data for the card: objective, positives, negatives, modality (+ extras)."""
        raise NotImplementedError


def check_batch(batch: object, *, ndim: int = 4) -> Tensor:
    """The ``images`` of a batch dict, checked: float (B, C, H, W); with ``ndim=3``, float
    (B, C, L) signals (for views that take sequences, e.g. ``nearfar.views.TemporalPairs``,
    whose ``input_ndim`` is 3)."""
    if not isinstance(batch, dict):
        raise ValueError(
            f"batch: expected a dict with 'images', 'labels', 'index', got {type(batch).__name__}"
        )
    if "images" not in batch:
        raise ValueError(f"batch: expected an 'images' entry, got keys {sorted(batch)}")
    x = batch["images"]
    if not isinstance(x, Tensor) or x.ndim != ndim or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        shape = "(B, C, H, W)" if ndim == 4 else "(B, C, L)" if ndim == 3 else f"{ndim}-D"
        raise ValueError(f"batch['images']: expected a float {shape} tensor, got {got}")
    if x.shape[0] < 2:
        raise ValueError(
            f"batch['images']: expected at least 2 items (negatives come from the batch), "
            f"got {x.shape[0]}"
        )
    return x
