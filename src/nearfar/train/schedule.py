"""Linear warmup then cosine decay of the learning rate, with a plain state_dict."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer


def warmup_cosine_factor(step: int, *, total_steps: int, warmup_steps: int,
                         min_lr_ratio: float) -> float:
    """Multiplier of the base lr for the update at (0-based) ``step``.

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, so the first
    update already moves and the last warmup step reaches 1. Then a half cosine from
    1 at ``step = warmup_steps`` to ``min_lr_ratio`` at ``step = total_steps``
    (Loshchilov & Hutter, 2017, without restarts).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets every group's lr to ``base_lr * warmup_cosine_factor(step)``.

    Call :meth:`step` after each ``optimizer.step()``. ``state_dict()`` is plain
    data (ints, floats), safe for ``torch.load(weights_only=True)``.
    """

    def __init__(self, optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps: expected an integer >= 1, got {total_steps!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {warmup_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.last_step = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        return warmup_cosine_factor(self.last_step if step is None else step,
                                    total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                                    min_lr_ratio=self.min_lr_ratio)

    def _apply(self) -> None:
        f = self.factor()
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.min_lr_ratio = float(state["min_lr_ratio"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()
