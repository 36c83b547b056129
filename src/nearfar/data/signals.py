"""Class-structured synthetic time series that ship with the package (no download).

``load_signals()`` (also ``load_dataset("signals")``, so a recipe can say
``[data] source = "signals"``) draws N one-channel signals of length L from eight
classes that differ in frequency content, waveform shape, burst pattern and temporal
order (a rising and a falling chirp share one spectrum). Every item gets its own random
frequency (within its class's band), phase / time shift, amplitude, DC offset and strong
additive Gaussian noise, so the raw samples of two items of one class are not aligned.

How hard it is (the default 4,000 signals, 3,000 train / 1,000 test split with seed 0 as
in the recipes; linear probe, chance 12.5%): raw samples 14%, log magnitude spectrum 61%;
randomly initialised encoders 78% (1-D conv, time-averaged) and 84% (conv chunks + GRU);
after 600 steps of the packaged recipes 91% (temporal_signals: SimCLR on adjacent
windows) and 96% (cpc_signals). Random features sit well below what learning reaches,
so the data tell a method that learns from one that does not.

The data are a pure function of ``(n, length, seed)``: the same arguments give the same
bytes (and the same ``sha256()``) on every machine.

    from nearfar.data import load_signals, train_test_split
    ds = load_signals()                        # 4,000 x (1, 512) float32, 8 classes
    train, test = train_test_split(ds, test_size=1000, seed=0)

Signals live in a :class:`SignalDataset`: the :class:`~nearfar.data.ImageDataset`
interface (``images``, ``labels``, ``meta``, ``subset``, ``sha256``, ``describe``,
``image_shape``, ``name`` / ``version`` / ``source``) for (N, C, L) tensors, so the
Trainer, ``train_test_split`` and the evaluation protocols take it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nearfar.data.bundled import available_datasets, register_dataset
from nearfar.data.dataset import ImageDataset

__all__ = ["SIGNAL_CLASSES", "SignalDataset", "load_signals", "make_signals"]

SIGNAL_CLASSES = (
    "sine",          # one sinusoid, period 24..64 samples
    "square",        # a (softened) square wave, same band: odd harmonics
    "chirp_up",      # a frequency sweep from slow (period 48..96) to fast (period 8..16)
    "chirp_down",    # the same sweep played backwards: the same spectrum, the other order
    "bursts",        # 2-4 short Gaussian-windowed bursts of a fast carrier, silence between
    "am",            # a fast carrier (period 6..10) under a slow amplitude envelope
    "pulse_train",   # narrow pulses every 24..48 samples
    "two_tone",      # a slow (period 32..64) plus a fast (period 5..8) sinusoid
)


@dataclass(repr=False)
class SignalDataset(ImageDataset):
    """(N, C, L) float signals with the :class:`ImageDataset` interface.

    Attributes:
        images: (N, C, L) floating-point tensor (any scale: signals are not in [0, 1]).
            Kept under the name ``images`` so the Trainer, the evaluation and
            ``train_test_split`` take a SignalDataset like an image dataset.
        labels, meta, name, version, source, label_names, split: as in ImageDataset.
    """

    def __post_init__(self) -> None:
        signals = self.images
        if not isinstance(signals, Tensor):
            raise ValueError(f"images: expected a torch.Tensor of signals, got "
                             f"{type(signals).__name__}")
        if signals.ndim != 3:
            raise ValueError(f"images: expected a 3-D tensor of signals (N, C, L), got shape "
                             f"{tuple(signals.shape)}")
        if not signals.is_floating_point():
            raise ValueError(f"images: expected floating-point signals, got {signals.dtype}")
        # the labels / meta / id checks of ImageDataset, on an (N, C, 1, L) view
        self.images = signals.unsqueeze(2)
        try:
            super().__post_init__()
        finally:
            self.images = signals

    @property
    def image_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """(C, L) of every signal."""
        c, length = self.images.shape[1:]
        return int(c), int(length)

    @property
    def signal_shape(self) -> tuple[int, int]:
        """(C, L) of every signal (the same as :attr:`image_shape`)."""
        c, length = self.images.shape[1:]
        return int(c), int(length)

    def float_images(self, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """All signals as a float tensor (a copy), optionally on ``device``."""
        x = self.images.to(device) if device is not None else self.images
        return x.to(dtype, copy=True)

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> SignalDataset:
        """The items at ``indices`` (in that order), with labels and metadata kept aligned."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"indices: expected values in [0, {n}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        idx = idx % max(n, 1)
        positions = idx.tolist()
        return SignalDataset(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            meta={k: [v[i] for i in positions] for k, v in self.meta.items()},
            name=self.name, version=self.version, source=self.source,
            label_names=None if self.label_names is None else list(self.label_names),
            split=None if self.split is None else dict(self.split),
        )

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["modality"] = "time series"
        out["signal_shape"] = list(self.signal_shape)
        return out

    def __repr__(self) -> str:
        c, length = self.signal_shape
        split = f", split={self.split.get('part')!r}" if self.split else ""
        return (f"SignalDataset(name={self.name!r}, version={self.version!r}, n={len(self)}, "
                f"signal=({c}, {length}) {str(self.images.dtype).replace('torch.', '')}, "
                f"classes={self.num_classes}{split})")


# ----------------------------------------------------------------------------- generator

def _band(rng: np.random.Generator, n: int, periods: tuple[float, float]) -> np.ndarray:
    """(n, 1) frequencies in cycles per sample, uniform in period within ``periods``."""
    return 1.0 / rng.uniform(periods[0], periods[1], size=(n, 1))


def _waveforms(klass: int, n: int, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, L) noise-free waveforms of one class, each with its own random parameters."""
    length = t.shape[1]
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, 1))
    name = SIGNAL_CLASSES[klass]
    if name in ("sine", "square"):
        angle = 2 * np.pi * _band(rng, n, (24.0, 64.0)) * t + phase
        return np.sin(angle) if name == "sine" else np.tanh(4.0 * np.sin(angle))
    if name in ("chirp_up", "chirp_down"):
        f0, f1 = _band(rng, n, (48.0, 96.0)), _band(rng, n, (8.0, 16.0))
        start = rng.uniform(-0.25, 0.25, size=(n, 1)) * length   # time shift of the sweep
        s = np.clip(t - start, 0.0, length)
        if name == "chirp_down":
            s = length - s
        return np.sin(2 * np.pi * (f0 * s + (f1 - f0) * s ** 2 / (2 * length)) + phase)
    if name == "bursts":
        carrier = np.sin(2 * np.pi * _band(rng, n, (5.0, 8.0)) * t + phase)
        count = rng.integers(2, 5, size=(n, 1))                  # 2..4 bursts
        centres = rng.uniform(0.0, length, size=(n, 4))
        width = rng.uniform(6.0, 14.0, size=(n, 4))
        used = np.arange(4)[None, :] < count                     # (n, 4)
        bumps = np.exp(-0.5 * ((t[:, None, :] - centres[..., None]) / width[..., None]) ** 2)
        return carrier * (bumps * used[..., None]).sum(1)
    if name == "am":
        carrier = np.sin(2 * np.pi * _band(rng, n, (6.0, 10.0)) * t + phase)
        envelope = 1.0 + 0.9 * np.sin(2 * np.pi * _band(rng, n, (128.0, 256.0)) * t
                                      + rng.uniform(0, 2 * np.pi, size=(n, 1)))
        return carrier * envelope
    if name == "pulse_train":
        period = rng.uniform(24.0, 48.0, size=(n, 1))
        d = (t - phase / (2 * np.pi) * period) % period
        d = np.minimum(d, period - d)
        return np.exp(-0.5 * (d / 1.5) ** 2)
    if name == "two_tone":
        slow = np.sin(2 * np.pi * _band(rng, n, (32.0, 64.0)) * t + phase)
        fast = np.sin(2 * np.pi * _band(rng, n, (5.0, 8.0)) * t
                      + rng.uniform(0, 2 * np.pi, size=(n, 1)))
        return slow + rng.uniform(0.5, 1.0, size=(n, 1)) * fast
    raise AssertionError(name)


def make_signals(n: int = 4000, length: int = 512, *, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(signals (n, 1, length) float32, labels (n,) int64), a pure function of the arguments.

    Classes are balanced (item i of the unshuffled draw has class i mod 8) and shuffled.
    Each waveform is scaled to unit standard deviation, then multiplied by an amplitude
    in [0.6, 1.4], shifted by a DC offset in [-0.2, 0.2] and given white Gaussian noise
    with a standard deviation in [0.3, 1.0] (a signal-to-noise ratio down to 0 dB).
    """
    for value, name, low in ((n, "n", len(SIGNAL_CLASSES)), (length, "length", 64)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SIGNAL_CLASSES))
    t = np.arange(length, dtype=np.float64)[None, :]
    x = np.empty((n, length), dtype=np.float64)
    for klass in range(len(SIGNAL_CLASSES)):
        rows = np.flatnonzero(labels == klass)
        x[rows] = _waveforms(klass, len(rows), t, rng)
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-8)
    x = x * rng.uniform(0.6, 1.4, size=(n, 1)) + rng.uniform(-0.2, 0.2, size=(n, 1))
    x = x + rng.normal(size=(n, length)) * rng.uniform(0.3, 1.0, size=(n, 1))
    return x.astype(np.float32)[:, None, :], labels.astype(np.int64)


def load_signals(n: int = 4000, length: int = 512, seed: int = 0) -> SignalDataset:
    """Synthetic class-structured time series: (n, 1, length) float32, 8 balanced classes.

    See the module docstring and :data:`SIGNAL_CLASSES` for what tells the classes apart.
    ``load_dataset("signals", n=..., length=..., seed=...)`` calls this.
    """
    x, y = make_signals(n, length, seed=seed)
    return SignalDataset(
        images=torch.from_numpy(x),
        labels=torch.from_numpy(y),
        meta={"id": list(range(n))},
        name="signals",
        version="1",
        source=f"nearfar.data.signals: synthetic class-structured time series "
               f"(n={n}, length={length}, seed={seed})",
        label_names=list(SIGNAL_CLASSES),
    )


if "signals" not in available_datasets():
    register_dataset("signals", load_signals)
