"""Temporal positives: two nearby windows of one sequence are a positive pair.

Slow features (what stays the same from one moment of a sequence to the next: the kind
of signal, the speaker, the activity) are what two windows a short gap apart share,
as in time-contrastive learning (Hyvarinen & Morioka, 2016; Sermanet et al., 2018)
and the "adjacent segments" positives of CPC-style audio and EEG pretraining
(Banville et al., 2021)::

    from nearfar.views.temporal import TemporalPairs
    pairs = TemporalPairs(window=128, min_gap=0, max_gap=64)
    x1, x2 = pairs(signals, generator)          # (B, C, 128) each; row i is a positive pair

A drop-in for :class:`~nearfar.views.TwoViews` in any two-view method (SimCLR, MoCo,
BYOL, ...) with an encoder that takes (B, C, W) windows, e.g. ``"conv1d"``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from nearfar.views.base import check_number, check_range, rand, randn

__all__ = ["TemporalPairs", "WindowPair", "temporal_signal_pairs"]


class WindowPair(NamedTuple):
    """Two windows per item and where they start (``first`` ends before ``second`` starts
    when the gap is >= 0)."""

    first: Tensor          # (B, C, W)
    second: Tensor         # (B, C, W)
    first_start: Tensor    # (B,) int64
    second_start: Tensor   # (B,) int64


def _check_int(value: object, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: expected an integer >= {low}, got {value!r}")
    return value


class TemporalPairs:
    """Two windows of ``window`` samples, ``gap`` samples apart, from every sequence.

    For item i a gap g_i is drawn uniformly from the integers in [min_gap, max_gap] and
    the first window's start s_i uniformly from every position that keeps both windows
    inside the sequence: ``0 <= s_i`` and ``s_i + 2 * window + g_i <= L``. The second
    window starts at ``s_i + window + g_i``. A negative gap makes the windows overlap
    by ``-g_i`` samples. No per-item Python loop: one gather with index arithmetic.

    Optional per-window jitter, so that a pair cannot be matched by a per-item constant
    (its level or loudness) alone: every window is multiplied by its own factor from
    ``scale`` and gets white noise of standard deviation ``noise``.

    Args:
        window: W, samples per window (>= 1).
        min_gap, max_gap: range of the gap between the end of the first window and the
            start of the second, in samples; ``min_gap > -window``.
        scale: [min, max] multiplicative jitter per window ([1, 1]: none).
        noise: standard deviation of additive Gaussian noise per sample (0: none).
    """

    name = "temporal_pairs"
    input_ndim = 3          # takes (B, C, L) sequences: methods check batches for it

    def __init__(self, window: int = 128, *, min_gap: int = 0, max_gap: int = 64,
                 scale: tuple[float, float] | list[float] = (1.0, 1.0), noise: float = 0.0
                 ) -> None:
        self.window = _check_int(window, "window", 1)
        self.min_gap = _check_int(min_gap, "min_gap", 1 - self.window)
        self.max_gap = _check_int(max_gap, "max_gap", self.min_gap)
        self.scale = check_range(scale, "scale", low=0.0)
        self.noise = check_number(noise, "noise", low=0.0)

    def min_length(self) -> int:
        """The shortest sequence both windows fit in, at the largest gap."""
        return 2 * self.window + self.max_gap

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> WindowPair:
        """The two windows of every sequence of ``x`` (B, C, L), and their start positions."""
        if not isinstance(x, Tensor) or x.ndim != 3 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name} input: expected a float (B, C, L) batch of "
                             f"sequences, got {got}")
        b, c, length = x.shape
        if length < self.min_length():
            raise ValueError(
                f"{self.name} input: sequences of {length} samples are too short for two "
                f"windows of {self.window} with a gap up to {self.max_gap} (need >= "
                f"{self.min_length()}); lower window or max_gap")
        device = x.device
        gaps = self.min_gap + (rand(b, generator, device)
                               * (self.max_gap - self.min_gap + 1)).long()
        gaps = gaps.clamp_(max=self.max_gap)
        room = length - 2 * self.window - gaps                      # last valid start
        first = (rand(b, generator, device) * (room + 1).to(torch.float32)).long()
        first = torch.minimum(first, room)
        second = first + self.window + gaps
        offsets = torch.arange(self.window, device=device)
        idx = torch.stack([first, second], 1)[:, :, None] + offsets  # (B, 2, W)
        idx = idx.reshape(b, 1, 2 * self.window).expand(b, c, 2 * self.window)
        both = x.gather(2, idx).reshape(b, c, 2, self.window)
        x1, x2 = both[:, :, 0], both[:, :, 1]
        x1, x2 = self._jitter(x1, generator), self._jitter(x2, generator)
        return WindowPair(x1, x2, first, second)

    def _jitter(self, w: Tensor, generator: torch.Generator | None) -> Tensor:
        lo, hi = self.scale
        if (lo, hi) != (1.0, 1.0):
            w = w * (lo + (hi - lo) * rand((w.shape[0], 1, 1), generator, w.device))
        if self.noise > 0:
            w = w + self.noise * randn(w.shape, generator, w.device, w.dtype)
        return w

    def __call__(self, x: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        pair = self.sample(x, generator)
        return pair.first, pair.second

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": (f"two windows of {self.window} samples of the same sequence, "
                            f"{self.min_gap}..{self.max_gap} samples apart, form a positive "
                            f"pair"),
            "window": self.window,
            "min_gap": self.min_gap,
            "max_gap": self.max_gap,
            "scale": list(self.scale),
            "noise": self.noise,
        }

    def __repr__(self) -> str:
        return (f"TemporalPairs(window={self.window}, min_gap={self.min_gap}, "
                f"max_gap={self.max_gap}, scale={list(self.scale)}, noise={self.noise})")


def temporal_signal_pairs() -> TemporalPairs:
    """The ``[views] preset = "temporal"`` of recipes: windows of 128 samples, 0..64 apart,
    each scaled by its own factor in [0.7, 1.3] (for the 512-sample ``"signals"`` data)."""
    return TemporalPairs(128, min_gap=0, max_gap=64, scale=(0.7, 1.3))
