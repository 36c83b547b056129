"""Contrastive Predictive Coding (van den Oord et al., 2018).

A chunk encoder turns each sequence into latents z_1..z_T (strided 1-D convolutions
over a signal, or a patch MLP over an image read in raster order), a GRU summarises
z_1..z_t into a context c_t, and K linear maps W_k predict the latent k steps ahead:
the prediction W_k c_t must pick out the true z_{t+k} among negatives (InfoNCE, scored
with the dot product as in the paper). Every position t with a full K-step future
(t = 1..T-K) is used.

Negatives (``negatives=``):

* ``"batch"`` (default): the latents of the other sequences of the batch at the same
  time step t+k (B - 1 per prediction), exactly :func:`nearfar.losses.cpc_loss`.
* ``"batch_and_time"``: every latent of every sequence in the batch at any step
  (B T - 1 per prediction), the "all time steps" variant; on periodic signals the
  sequence's own latents one period away are near copies of the positive (false
  negatives), which this variant pushes away too.

Downstream, :meth:`CPC.embed` pools the context (default: c_t averaged over t); the
encoder that a run ships is chunks + GRU (:class:`nearfar.nn.SequenceEncoder`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar.losses import info_nce
from nearfar.methods.base import Method, StepOutput
from nearfar.methods.registry import register_method
from nearfar.nn import parameter_count, resolve_encoder
from nearfar.nn.sequence import POOLS, SequenceEncoder

NEGATIVES = ("batch", "batch_and_time")
SIMILARITIES = ("dot", "cosine")


def per_step_info_nce(predictions: Tensor, targets: Tensor, *, temperature: float = 1.0,
                      similarity: str = "dot") -> Tensor:
    """:func:`nearfar.losses.cpc_loss` for many steps at once: the same value, from one
    batched matrix product over the S steps instead of a Python loop.

    ``cpc_loss`` slices one step at a time; with S = (T - K) * K steps (every context
    position times every prediction step: 112 for T = 32, K = 4) its backward writes a
    full (B, S, D) gradient per step, O(S^2) work, which dominated a CPC step on a CPU.

    Args:
        predictions, targets: (B, S, D); at step s, prediction b must pick out target b
            among the B targets of that step.
        temperature: > 0.
        similarity: "dot" or "cosine".

    Returns:
        Scalar loss, the mean over steps and items (equal to ``cpc_loss`` with the same
        arguments; tests/test_cpc.py checks it).
    """
    if predictions.ndim != 3 or predictions.shape != targets.shape \
            or predictions.shape[0] < 2:
        raise ValueError(f"predictions, targets: expected two (B, S, D) tensors of one shape "
                         f"with B >= 2, got {tuple(predictions.shape)} and "
                         f"{tuple(targets.shape)}")
    p, q = predictions.float().transpose(0, 1), targets.float().transpose(0, 1)  # (S, B, D)
    if similarity == "cosine":
        p, q = F.normalize(p, dim=-1), F.normalize(q, dim=-1)
    scores = (p / temperature) @ q.transpose(1, 2)                              # (S, B, B)
    s, b = scores.shape[:2]
    labels = torch.arange(b, device=scores.device).repeat(s)
    return F.cross_entropy(scores.reshape(s * b, b), labels)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


@register_method("cpc")
class CPC(Method):
    """Chunk encoder -> GRU context -> K step predictors, InfoNCE against in-batch negatives.

    Args:
        encoder: a chunk encoder (a module mapping a batch to (B, T, D) latents, with
            ``out_dim`` and ``sequence_output = True``) or a registered name:
            ``"conv1d_chunks"`` for (B, C, L) signals, ``"patch_chunks"`` for (B, C, H, W)
            images read as a sequence of patches.
        views: optional augmentation applied to every sequence before encoding (a
            pipeline ``views(x, generator) -> x``; of a pair maker the first view is
            used); None: the raw sequences (the positives come from the sequence itself).
        steps: K, how many steps ahead are predicted (one linear map W_k each).
        context_dim: hidden size of the GRU context model.
        negatives: ``"batch"`` or ``"batch_and_time"`` (module docstring).
        temperature: > 0; the scores are divided by it.
        similarity: ``"dot"`` (the paper's log-bilinear score) or ``"cosine"``.
        pool: the downstream feature, ``"context_mean"``, ``"context_last"`` or
            ``"latent_mean"``.
        encoder_kwargs: constructor keywords when ``encoder`` is a name.
        seed: seeds the views when no generator is passed to :meth:`loss`.
        tile: as in :func:`nearfar.losses.info_nce`.
    """

    name = "cpc"
    views_per_item = 1

    def __init__(self, encoder: nn.Module | str = "conv1d_chunks", views: Callable | None = None,
                 *, steps: int = 4, context_dim: int = 128, negatives: str = "batch",
                 temperature: float = 1.0, similarity: str = "dot", pool: str = "context_mean",
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 tile: int | None = None) -> None:
        super().__init__()
        encoder = resolve_encoder(encoder, encoder_kwargs)
        if not isinstance(encoder, nn.Module) or not getattr(encoder, "sequence_output", False):
            raise ValueError(
                f"encoder: expected a chunk encoder returning (B, T, D) latents (a module with "
                f"sequence_output = True, e.g. 'conv1d_chunks' or 'patch_chunks'), got "
                f"{type(encoder).__name__}")
        self.steps = _positive_int(steps, "steps")
        _positive_int(context_dim, "context_dim")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives: expected one of {', '.join(NEGATIVES)}, got "
                             f"{negatives!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity: expected one of {', '.join(SIMILARITIES)}, got "
                             f"{similarity!r}")
        if pool not in POOLS:
            raise ValueError(f"pool: expected one of {', '.join(POOLS)}, got {pool!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        if views is not None and not callable(views):
            raise ValueError(f"views: expected None or a callable (x, generator) -> x, got "
                             f"{type(views).__name__}")
        self.encoder = SequenceEncoder(encoder, context_dim, pool=pool)
        latent = self.encoder.latent_dim
        # W_1..W_K as one linear map to K * D: predictions[..., k, :] = W_{k+1} c_t
        self.predictors = nn.Linear(context_dim, self.steps * latent)
        self.views = views
        self.negatives = negatives
        self.temperature = float(temperature)
        self.similarity = similarity
        self.seed = int(seed)
        self.tile = tile
        self.modality = getattr(encoder, "modality", "sequence")
        self._own_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ downstream
    def embed(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    # ------------------------------------------------------------------ objective
    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._own_generator
        if g is None or g.device != device:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._own_generator = g
        return g

    def _inputs(self, batch: Any, generator: torch.Generator | None) -> Tensor:
        if not isinstance(batch, dict) or "images" not in batch:
            raise ValueError("batch: expected a dict with an 'images' entry (B, C, L) signals "
                             "or (B, C, H, W) images")
        x = batch["images"]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 3:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"batch['images']: expected a float (B, C, L) or (B, C, H, W) "
                             f"tensor, got {got}")
        if x.shape[0] < 2:
            raise ValueError(f"batch['images']: expected at least 2 items (negatives come from "
                             f"the batch), got {x.shape[0]}")
        if self.views is None:
            return x
        g = generator if generator is not None else self._generator(x.device)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            out = self.views(x, g)
        return out[0] if isinstance(out, (tuple, list)) else out

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(latents z (B, T, D), predictions (B, T-K, K, D), targets (B, T-K, K, D), pooled
        embedding (B, out_dim)): predictions[:, t, k] = W_{k+1} c_t and
        targets[:, t, k] = z_{t+k+1}."""
        z, c = self.encoder.encode(x)
        z = z.float()
        b, t_len, d = z.shape
        positions = t_len - self.steps
        if positions < 1:
            raise ValueError(
                f"{type(self.encoder.chunks).__name__} gives {t_len} latents per sequence for "
                f"input {tuple(x.shape)}: too few to predict steps={self.steps} ahead (need "
                f"at least {self.steps + 1}); use longer sequences, less downsampling or fewer "
                f"steps")
        preds = self.predictors(c[:, :positions].float()).reshape(b, positions, self.steps, d)
        targets = z[:, self._ahead(positions, z.device)]               # (B, T-K, K, D)
        return z, preds, targets, self.encoder.pooled(z, c)

    def _ahead(self, positions: int, device: torch.device) -> Tensor:
        """(T-K, K) int64: t + k for every context position t and step k = 1..K."""
        return torch.arange(positions, device=device)[:, None] \
            + torch.arange(1, self.steps + 1, device=device)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        x = self._inputs(batch, generator)
        z, preds, targets, pooled = self.predict(x)
        b, positions, steps, d = preds.shape
        if self.negatives == "batch":
            # every (t, k) is one "step" of cpc_loss: its negatives are the other items'
            # latents at that same time step t + k
            loss = per_step_info_nce(preds.reshape(b, positions * steps, d),
                                     targets.reshape(b, positions * steps, d),
                                     temperature=self.temperature, similarity=self.similarity)
        else:
            # candidates: all B * T latents; the positive of (b, t, k) is row b * T + t + k
            t_len = z.shape[1]
            rows = torch.arange(b, device=z.device)[:, None, None] * t_len
            index = (rows + self._ahead(positions, z.device)).reshape(-1)
            loss = info_nce(preds.reshape(-1, d), z.reshape(-1, d), index,
                            temperature=self.temperature, similarity=self.similarity,
                            tile=self.tile)
        with torch.no_grad():
            accuracy = self._batch_accuracy(preds.detach(), targets.detach())
        return StepOutput(loss=loss, metrics={"cpc_accuracy": accuracy},
                          embeddings=pooled.detach().float())

    def _batch_accuracy(self, preds: Tensor, targets: Tensor) -> Tensor:
        """Share of (item, t, k) whose prediction scores its own target highest among the
        B targets of that step."""
        b = preds.shape[0]
        p = preds.reshape(b, -1, preds.shape[-1]).transpose(0, 1)      # (S, B, D)
        q = targets.reshape(b, -1, targets.shape[-1]).transpose(0, 1)
        if self.similarity == "cosine":
            p, q = F.normalize(p, dim=-1), F.normalize(q, dim=-1)
        scores = p @ q.transpose(1, 2)                                   # (S, B, B)
        hit = scores.argmax(-1) == torch.arange(b, device=scores.device)
        return hit.float().mean()

    # ------------------------------------------------------------------ card
    def describe(self) -> dict[str, Any]:
        n = self.batch_size
        chunks = self.encoder.chunks
        if self.negatives == "batch":
            negatives = {
                "source": "in-batch",
                "construction": "latents of other sequences at the same step (in-batch)",
                "batch_size": n,
                "per_anchor": None if n is None else n - 1,
                "exclusions": ["the sequence's own latents at other steps"],
            }
        else:
            negatives = {
                "source": "in-batch",
                "construction": "latents of every sequence in the batch at every step, the "
                                "anchor's own sequence included (in-batch, all time steps)",
                "batch_size": n,
                "per_anchor": "B * T - 1",
                "exclusions": [],
            }
        views: Any = ["none: positives come from the sequence itself (its future chunks)"]
        if self.views is not None:
            describe = getattr(self.views, "describe", None)
            views = describe() if callable(describe) else type(self.views).__name__
        return {
            "method": "cpc",
            "reference": "van den Oord et al., 2018",
            "objective": {
                "loss": "cpc_loss (InfoNCE per prediction step)",
                "prediction_steps": self.steps,
                "temperature": self.temperature,
                "similarity": self.similarity,
                "context_model": {"class": "GRU", "hidden_dim": self.encoder.context.out_dim},
                "head_downstream": "kept (the context model is part of the encoder)",
                "downstream_feature": self.encoder.pool,
            },
            "positives": {
                "construction": "the true future latent k steps ahead (k = 1..K) of the same "
                                "sequence, predicted from the context c_t by a linear map W_k",
                "views": views,
            },
            "negatives": negatives,
            "modality": self.modality,
            "encoder": {
                "class": type(self.encoder).__name__,
                "chunks": type(chunks).__name__,
                "latent_dim": self.encoder.latent_dim,
                "out_dim": int(self.encoder.out_dim),
                "parameters": parameter_count(self.encoder),
            },
        }
