"""Embedding a whole dataset with a frozen encoder, batch by batch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from nearfar.evaluate.inputs import check_int


def _module_device(fn: object) -> torch.device | None:
    if isinstance(fn, nn.Module):
        for p in fn.parameters():
            return p.device
        for b in fn.buffers():
            return b.device
    return None


def embed_dataset(embed_fn: Callable[[Tensor], Tensor], images, *, batch_size: int = 512,
                  device: torch.device | str | None = None) -> Tensor:
    """Run ``embed_fn`` over ``images`` in batches, without gradients.

    Args:
        embed_fn: a callable (an ``nn.Module`` or a method's ``embed``) mapping a
            (B, ...) float batch to (B, D) embeddings. An ``nn.Module`` is put in eval
            mode for the pass and restored to its previous mode afterwards.
        images: (N, ...) tensor or numpy array, e.g. (N, C, H, W). uint8 values are
            scaled to float32 in [0, 1]; floating input is cast to float32 as is.
        batch_size: rows per call, >= 1.
        device: where batches are sent; None takes the module's parameter device,
            else the CPU.

    Returns:
        (N, D) float32 tensor on the CPU.
    """
    if not callable(embed_fn):
        raise ValueError(f"embed_fn: expected a callable, got {type(embed_fn).__name__}")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise ValueError(
            f"images: expected a torch.Tensor or numpy array, got {type(images).__name__}"
        )
    if images.ndim < 2 or images.shape[0] < 1:
        raise ValueError(f"images: expected shape (N, ...) with N >= 1, got "
                         f"{tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images: expected uint8 or floating values, got dtype {images.dtype}")
    batch_size = check_int(batch_size, "batch_size", low=1)
    if device is None:
        device = _module_device(embed_fn) or torch.device("cpu")
    device = torch.device(device)

    was_training = embed_fn.training if isinstance(embed_fn, nn.Module) else None
    if was_training:
        embed_fn.eval()
    out: list[Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size].to(device)
                if batch.dtype == torch.uint8:
                    batch = batch.float().div_(255.0)
                else:
                    batch = batch.float()
                emb = embed_fn(batch)
                if not isinstance(emb, Tensor) or emb.ndim != 2 or emb.shape[0] != len(batch):
                    got = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
                    raise ValueError(
                        f"embed_fn: expected a ({len(batch)}, D) tensor for a batch of "
                        f"{len(batch)}, got {got}"
                    )
                out.append(emb.detach().float().cpu())
    finally:
        if was_training:
            embed_fn.train()
    return torch.cat(out)
