"""LARS, layer-wise adaptive rate scaling (You et al., 2017), and parameter grouping."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer


def split_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: weights (decayed, LARS-adapted) and biases/norm parameters.

    Every trainable parameter with ``ndim <= 1`` (biases, BatchNorm/LayerNorm scales
    and shifts, learnable temperatures) goes to the second group, which has no
    weight decay and ``lars_adapt=False``, as in SimCLR and You et al. (2017).
    """
    adapt, plain = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (adapt if p.ndim > 1 else plain).append(p)
    groups = []
    if adapt:
        groups.append({"params": adapt, "weight_decay": weight_decay, "lars_adapt": True})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "lars_adapt": False})
    return groups


class LARS(Optimizer):
    """SGD with momentum and a per-parameter trust ratio (You et al., 2017).

    For a parameter ``w`` with gradient ``g`` in a group with ``lars_adapt=True``::

        d = g + weight_decay * w
        d = d * trust_coefficient * ||w|| / ||d||      (when both norms are > 0)
        v = momentum * v + d
        w = w - lr * v

    Groups with ``lars_adapt=False`` skip the trust ratio (plain SGD with momentum
    plus their own weight decay, usually 0); see :func:`split_decay_groups`.

    Args:
        params: parameters or parameter groups (a group may set ``lars_adapt``).
        lr: learning rate (> 0).
        momentum: in [0, 1).
        weight_decay: >= 0.
        trust_coefficient: eta in the paper (> 0), 1e-3 by default.
        eps: added to ``||d||`` in the trust ratio.
    """

    def __init__(self, params: Iterable, lr: float, *, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 1e-3,
                 eps: float = 1e-8) -> None:
        if not lr > 0:
            raise ValueError(f"lr: expected a number > 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay: expected a number >= 0, got {weight_decay!r}")
        if not trust_coefficient > 0:
            raise ValueError(f"trust_coefficient: expected a number > 0, got "
                             f"{trust_coefficient!r}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "eps": eps, "lars_adapt": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    d = d.add(p, alpha=wd)
                if group["lars_adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["trust_coefficient"] * w_norm / (d_norm + group["eps"]),
                        torch.ones_like(w_norm),
                    )
                    d = d.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(mom).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
