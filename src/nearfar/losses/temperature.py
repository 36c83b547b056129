"""Learnable temperatures, kept in log space so they stay positive."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .checks import check_positive_scalar

CLIP_MAX_SCALE = 100.0


class LogitScale(nn.Module):
    """CLIP's learnable inverse temperature (Radford et al., 2021).

    The parameter ``logit_scale`` is log(1 / temperature), initialised at log(1 / 0.07);
    calling the module returns the scale ``logit_scale.exp().clamp(max=max_scale)``.
    Pass the module itself (or its ``logit_scale`` parameter) to `clip_loss`.
    """

    def __init__(self, temperature: float = 0.07, *, max_scale: float = CLIP_MAX_SCALE):
        super().__init__()
        check_positive_scalar(temperature, "temperature")
        check_positive_scalar(max_scale, "max_scale")
        self.max_scale = float(max_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def extra_repr(self) -> str:
        return f"scale={float(self.forward()):.4g}, max_scale={self.max_scale:g}"


class Temperature(nn.Module):
    """A learnable temperature stored as its log; calling it returns the temperature,
    clamped below at ``min_temperature``. Pass ``module()`` as ``temperature=``."""

    def __init__(self, temperature: float = 0.1, *, min_temperature: float = 0.01):
        super().__init__()
        check_positive_scalar(temperature, "temperature")
        check_positive_scalar(min_temperature, "min_temperature")
        self.min_temperature = float(min_temperature)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self) -> Tensor:
        return self.log_temperature.exp().clamp(min=self.min_temperature)

    def extra_repr(self) -> str:
        return f"temperature={float(self.forward()):.4g}, min={self.min_temperature:g}"
