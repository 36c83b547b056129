"""Stop a run early, with a message a person can act on, when training goes wrong."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the weights were not updated with it."""

    def __init__(self, message: str, *, step: int, loss: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss


class EmbeddingCollapse(RuntimeError):
    """The embeddings stopped spreading out: every item maps to (nearly) the same point."""

    def __init__(self, message: str, *, step: int, spread: float) -> None:
        super().__init__(message)
        self.step = step
        self.spread = spread


def embedding_spread(embeddings: Tensor) -> float:
    """Mean per-dimension std of the L2-normalised rows, times sqrt(D).

    About 1 for points spread uniformly over the unit sphere, 0 when all rows point
    the same way; scale-free, so comparable across embedding sizes.
    """
    z = F.normalize(embeddings.detach().float(), dim=1)
    if z.shape[0] < 2:
        return float("nan")
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


class CollapseGuard:
    """Counts consecutive steps whose :func:`embedding_spread` is below ``threshold``."""

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold = float(threshold)
        self.patience = int(patience)
        self.streak = 0

    def update(self, embeddings: Tensor | None, step: int) -> float | None:
        """Record one step; raises :class:`EmbeddingCollapse` after ``patience`` low ones."""
        if embeddings is None or self.threshold <= 0:
            return None
        with torch.no_grad():
            spread = embedding_spread(embeddings)
        if spread < self.threshold:
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= self.patience:
            raise EmbeddingCollapse(
                f"embeddings collapsed at step {step}: their spread (mean per-dimension std "
                f"of the normalised embeddings x sqrt(D); 1 = uniform on the sphere, 0 = all "
                f"identical) stayed below {self.threshold:g} for {self.streak} consecutive "
                f"steps (now {spread:.3g}). Usual causes: a learning rate too high, too few "
                f"negatives (batch too small) or views too weak/strong; lower the lr or "
                f"change the method's settings. TrainConfig(collapse_std=0) disables this "
                f"guard.",
                step=step, spread=spread,
            )
        return spread


def check_finite_loss(loss: float, step: int, *, lr: float, precision: str,
                      last_checkpoint: str | None) -> None:
    """Raise :class:`TrainingDiverged` when ``loss`` is NaN or infinite."""
    if math.isfinite(loss):
        return
    where = (f"the last checkpoint ({last_checkpoint}) is untouched"
             if last_checkpoint else "no checkpoint was written for this state")
    hints = [f"a lower lr (now {lr:.3g})", "a longer warmup", "grad_clip=1.0"]
    if precision != "fp32":
        hints.append("precision='fp32'")
    raise TrainingDiverged(
        f"training diverged at step {step}: the loss is {loss}; the weights were not updated "
        f"with it and {where}. Try {', '.join(hints)}.",
        step=step, loss=loss,
    )
