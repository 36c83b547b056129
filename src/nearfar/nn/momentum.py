"""A momentum (EMA) copy of a module, the slow "key" / "target" / "teacher" network.

MoCo (He et al., 2020) calls it the momentum key encoder, BYOL (Grill et al., 2020) the
target network, DINO (Caron et al., 2021) the teacher. After every optimizer step its
parameters move towards the online ones:

    target <- m * target + (1 - m) * online

with ``m`` either constant (MoCo v1/v2: 0.999) or raised from ``base`` to 1.0 along a
half cosine over training (BYOL, MoCo v3, DINO):

    m(progress) = 1 - (1 - base) * (cos(pi * progress) + 1) / 2

so ``m(0) = base`` and ``m(1) = 1``. The copy never receives gradients and is not seen by
the optimizer (its parameters have ``requires_grad=False``). Buffers (BatchNorm running
statistics) are not averaged: the copy keeps its own, updated by its own forward passes
in training mode, as in the reference MoCo and BYOL code.

Usage inside a method::

    self.target = EMA(nn.Sequential(self.encoder, self.head), base_momentum=0.99)
    ...
    with torch.no_grad():
        k = self.target(x2)
    ...
    def after_step(self, progress):
        self.target.update(nn.Sequential(self.encoder, self.head), progress)
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

SCHEDULES = ("cosine", "constant")


def cosine_momentum(progress: float, base: float) -> float:
    """The BYOL / MoCo v3 / DINO schedule: ``base`` at progress 0, rising to 1.0 at 1."""
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * p) + 1.0) / 2.0


def _check_momentum(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


class EMA(nn.Module):
    """A frozen copy of ``online`` that tracks it by an exponential moving average.

    Args:
        online: the module to copy (deep-copied once; the copy is independent of it).
        base_momentum: m at the start of training, in [0, 1] (BYOL 0.996, MoCo v3 0.99,
            DINO 0.996, MoCo v2 0.999 constant).
        schedule: "cosine" (m rises from base to 1.0 with progress) or "constant".

    Attributes:
        module: the copy; ``EMA(...)(x)`` runs it.
        momentum: the m used by the latest :meth:`update` (``base_momentum`` before any),
            a float; ``last_momentum`` holds it as a 0-d buffer (saved with the weights,
            so a resumed run logs the same values; log it without a device sync).
    """

    def __init__(self, online: nn.Module, base_momentum: float = 0.996, *,
                 schedule: str = "cosine") -> None:
        super().__init__()
        if not isinstance(online, nn.Module):
            raise ValueError(f"online: expected an nn.Module, got {type(online).__name__}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got "
                             f"{schedule!r}")
        self.base_momentum = _check_momentum(base_momentum, "base_momentum")
        self.schedule = schedule
        self.module = copy.deepcopy(online)
        self.module.requires_grad_(False)
        self.register_buffer("last_momentum",
                             torch.tensor(self.base_momentum, dtype=torch.float64))

    @property
    def momentum(self) -> float:
        return float(self.last_momentum)

    def forward(self, *args, **kwargs) -> Tensor:
        return self.module(*args, **kwargs)

    def momentum_at(self, progress: float) -> float:
        """m at ``progress`` in [0, 1] (clamped) under this copy's schedule."""
        if self.schedule == "constant":
            return self.base_momentum
        return cosine_momentum(progress, self.base_momentum)

    @torch.no_grad()
    def update(self, online: nn.Module, progress: float | None = None, *,
               momentum: float | None = None) -> float:
        """Move every parameter towards ``online``'s: ``t = m t + (1 - m) o``.

        Args:
            online: a module with the same parameter names and shapes as the copy.
            progress: training progress in [0, 1] for the schedule.
            momentum: an explicit m instead of the schedule (progress is then ignored).

        Returns:
            The m used.
        """
        if momentum is not None:
            m = _check_momentum(momentum, "momentum")
        elif progress is None:
            raise ValueError("update: expected progress (0..1) or an explicit momentum")
        else:
            m = self.momentum_at(progress)
        targets = dict(self.module.named_parameters())
        sources = dict(online.named_parameters())
        if targets.keys() != sources.keys():
            missing = sorted(set(targets) ^ set(sources))[:5]
            raise ValueError(f"online: expected the same parameters as the momentum copy, "
                             f"they differ in {missing}")
        t_list, o_list = [], []
        for name, t in targets.items():
            o = sources[name]
            if o.shape != t.shape:
                raise ValueError(f"online: parameter {name} has shape {tuple(o.shape)}, the "
                                 f"momentum copy {tuple(t.shape)}")
            t_list.append(t)
            o_list.append(o.detach().to(t.dtype))
        if t_list:
            if m == 1.0:
                pass
            elif m == 0.0:
                torch._foreach_copy_(t_list, o_list)
            else:
                torch._foreach_lerp_(t_list, o_list, 1.0 - m)
        self.last_momentum.fill_(m)
        return m

    def extra_repr(self) -> str:
        return f"base_momentum={self.base_momentum}, schedule={self.schedule!r}"
