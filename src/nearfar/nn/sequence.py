"""Sequence encoders: chunk encoders that turn an input into T latents, a GRU context model,
and the pair of them as one downstream encoder (the CPC encoder of van den Oord et al., 2018).

* :class:`Conv1dChunks` (``"conv1d_chunks"``): strided 1-D convolutions over a (B, C, L)
  signal, one latent per ``prod(strides)`` samples: (B, T, D).
* :class:`PatchChunks` (``"patch_chunks"``): an image (B, C, H, W) as a sequence of
  patches in raster order (rows: ``patch=(1, W)``; 7x7 tiles: ``patch=7``), each
  encoded by a small MLP: (B, T, D).
* :class:`Conv1dEncoder` (``"conv1d"``): ``Conv1dChunks`` averaged over time, (B, D),
  for the two-view methods on signals (any length: windows and whole signals alike).
* :class:`ContextGRU`: the autoregressive context model c_t = GRU(z_1..z_t).
* :class:`SequenceEncoder`: chunks + context + pooling, (B, out_dim); what a CPC run
  ships and what ``embed`` uses downstream.

Chunk encoders set ``sequence_output = True`` and ``out_dim``; every encoder has
``out_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar.nn.registry import register_encoder

__all__ = ["POOLS", "ContextGRU", "Conv1dChunks", "Conv1dEncoder", "PatchChunks",
           "SequenceEncoder"]

POOLS = ("context_mean", "context_last", "latent_mean")


def _ints(values: Sequence[int] | int, name: str, n: int | None = None) -> tuple[int, ...]:
    out = (values,) if isinstance(values, int) else tuple(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out) \
            or (n is not None and len(out) != n):
        want = f"{n} positive integers" if n is not None else "positive integers"
        raise ValueError(f"{name}: expected {want}, got {values!r}")
    return out


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each time step of a (B, C, T) tensor: no statistics
    across time (a latent never sees the future) nor across the batch (no leak between
    the items that serve as each other's negatives)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def _check_rank(x: Tensor, rank: int, what: str, owner: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != rank:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{owner}: expected {what}, got {got}")


@register_encoder("conv1d_chunks")
class Conv1dChunks(nn.Module):
    """Strided 1-D conv -> ChannelNorm -> ReLU blocks: (B, C, L) -> (B, T, out_dim).

    Args:
        in_channels: channels of the signal.
        widths: output channels of each block.
        kernels: kernel size of each block (default 8, then 4s).
        strides: stride of each block (default 4, then 2s); each block takes T to
            floor(T / stride), so T = L / prod(strides) for L a multiple of it.
        out_dim: latent size; a final 1x1 convolution maps ``widths[-1]`` to it when they
            differ.
    """

    sequence_output = True
    modality = "time series"

    def __init__(self, in_channels: int = 1, *, widths: Sequence[int] = (64, 64, 64),
                 kernels: Sequence[int] | None = None, strides: Sequence[int] | None = None,
                 out_dim: int | None = None) -> None:
        super().__init__()
        widths = _ints(widths, "widths")
        n = len(widths)
        kernels = _ints(kernels if kernels is not None else (8,) + (4,) * (n - 1), "kernels", n)
        strides = _ints(strides if strides is not None else (4,) + (2,) * (n - 1), "strides", n)
        (in_channels,) = _ints(in_channels, "in_channels", 1)
        layers: list[nn.Module] = []
        c = in_channels
        for w, k, s in zip(widths, kernels, strides):
            # padding so that T becomes floor(T / s) per block, whatever the kernel
            layers += [nn.ConstantPad1d(((k - s) // 2, k - s - (k - s) // 2), 0.0),
                       nn.Conv1d(c, w, k, stride=s), ChannelNorm(w), nn.ReLU(inplace=True)]
            c = w
        self.out_dim = int(out_dim) if out_dim is not None else widths[-1]
        if self.out_dim != c:
            layers.append(nn.Conv1d(c, self.out_dim, 1))
        self.net = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.downsampling = int(torch.tensor(strides).prod())

    def forward(self, x: Tensor) -> Tensor:
        _check_rank(x, 3, "a (B, C, L) signal batch", "Conv1dChunks input")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Conv1dChunks input: expected {self.in_channels} channels, got "
                             f"{x.shape[1]} (shape {tuple(x.shape)}); set in_channels")
        return self.net(x).transpose(1, 2)


@register_encoder("conv1d")
class Conv1dEncoder(nn.Module):
    """:class:`Conv1dChunks` averaged over time: (B, C, L) -> (B, out_dim), any L."""

    modality = "time series"

    def __init__(self, in_channels: int = 1, *, widths: Sequence[int] = (64, 64, 64),
                 kernels: Sequence[int] | None = None, strides: Sequence[int] | None = None,
                 out_dim: int | None = None) -> None:
        super().__init__()
        self.chunks = Conv1dChunks(in_channels, widths=widths, kernels=kernels,
                                   strides=strides, out_dim=out_dim)
        self.out_dim = self.chunks.out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.chunks(x).mean(1)


@register_encoder("patch_chunks")
class PatchChunks(nn.Module):
    """An image as a sequence of patches in raster order, each through a small MLP.

    (B, C, H, W) -> (B, T, out_dim), T the number of patch positions (row-major).

    Args:
        in_channels: image channels.
        patch: patch (height, width), or one int for square patches; ``(1, W)`` makes
            every row one step, ``7`` cuts a 28x28 digit into 16 tiles.
        stride: step between patches (default: the patch size, no overlap).
        hidden_dim: width of the MLP's hidden layer.
        out_dim: latent size.
    """

    sequence_output = True
    modality = "image (a sequence of patches in raster order)"

    def __init__(self, in_channels: int = 1, *, patch: Sequence[int] | int = 7,
                 stride: Sequence[int] | int | None = None, hidden_dim: int = 128,
                 out_dim: int = 64) -> None:
        super().__init__()
        (in_channels,) = _ints(in_channels, "in_channels", 1)
        self.patch = _ints(patch, "patch")
        if len(self.patch) == 1:
            self.patch = self.patch * 2
        self.stride = self.patch if stride is None else _ints(stride, "stride")
        if len(self.stride) == 1:
            self.stride = self.stride * 2
        if len(self.patch) != 2 or len(self.stride) != 2:
            raise ValueError(f"patch / stride: expected an int or (height, width), got "
                             f"{patch!r} / {stride!r}")
        (hidden_dim,) = _ints(hidden_dim, "hidden_dim", 1)
        (out_dim,) = _ints(out_dim, "out_dim", 1)
        d_in = in_channels * self.patch[0] * self.patch[1]
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden_dim), nn.LayerNorm(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.in_channels = in_channels
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        _check_rank(x, 4, "a (B, C, H, W) image batch", "PatchChunks input")
        if x.shape[1] != self.in_channels or x.shape[2] < self.patch[0] \
                or x.shape[3] < self.patch[1]:
            raise ValueError(f"PatchChunks input: expected {self.in_channels} channels and at "
                             f"least {self.patch[0]}x{self.patch[1]} pixels, got shape "
                             f"{tuple(x.shape)}")
        patches = F.unfold(x, kernel_size=self.patch, stride=self.stride)  # (B, C*ph*pw, T)
        return self.mlp(patches.transpose(1, 2))


class ContextGRU(nn.Module):
    """The autoregressive context model: c_t = GRU(z_1, ..., z_t); (B, T, D) -> (B, T, H)."""

    def __init__(self, in_dim: int, hidden_dim: int = 128, *, num_layers: int = 1) -> None:
        super().__init__()
        (in_dim, hidden_dim, num_layers) = _ints((in_dim, hidden_dim, num_layers),
                                                 "in_dim, hidden_dim, num_layers", 3)
        self.gru = nn.GRU(in_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.out_dim = hidden_dim

    def forward(self, z: Tensor) -> Tensor:
        # the GRU runs in float32 (no bf16 GRU kernels on every backend)
        with torch.autocast(z.device.type, enabled=False):
            return self.gru(z.float())[0]


class SequenceEncoder(nn.Module):
    """Chunk encoder + context model + pooling: (B, ...) -> (B, out_dim).

    Args:
        chunks: a module mapping a batch to (B, T, D) latents, with ``out_dim``.
        context_dim: hidden size of the :class:`ContextGRU`.
        pool: the downstream feature: ``"context_mean"`` (c_t averaged over t),
            ``"context_last"`` (c_T, the summary of the whole sequence) or
            ``"latent_mean"`` (z_t averaged over t; ignores the context model).
    """

    def __init__(self, chunks: nn.Module, context_dim: int = 128, *,
                 pool: str = "context_mean", num_layers: int = 1) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool: expected one of {', '.join(POOLS)}, got {pool!r}")
        self.chunks = chunks
        self.context = ContextGRU(int(chunks.out_dim), context_dim, num_layers=num_layers)
        self.pool = pool
        self.latent_dim = int(chunks.out_dim)
        self.out_dim = self.latent_dim if pool == "latent_mean" else self.context.out_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(latents z (B, T, D), contexts c (B, T, H))."""
        z = self.chunks(x)
        return z, self.context(z)

    def pooled(self, z: Tensor, c: Tensor) -> Tensor:
        if self.pool == "latent_mean":
            return z.float().mean(1)
        return c.mean(1) if self.pool == "context_mean" else c[:, -1]

    def forward(self, x: Tensor) -> Tensor:
        if self.pool == "latent_mean":
            return self.chunks(x).float().mean(1)
        return self.pooled(*self.encode(x))
