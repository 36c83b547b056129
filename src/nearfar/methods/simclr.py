"""SimCLR (Chen et al., 2020): two random views of each image, NT-Xent over the batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar.distributed import resolve_gather
from nearfar.losses import hard_negative_info_nce, info_nce, nt_xent, partner_index
from nearfar.methods.base import StepOutput
from nearfar.methods.metrics import false_negative_rate
from nearfar.methods.processes import check_gather_option, check_local_loss, processes_card
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import TwoViewMethod
from nearfar.nn import ProjectionHead

LOSSES = ("nt_xent", "debiased", "hard_negative")


@register_method("simclr")
class SimCLR(TwoViewMethod):
    """Encoder -> projection head -> NT-Xent between two views of every image.

    Args:
        encoder: an ``nn.Module`` with an ``out_dim`` attribute, or a registered
            encoder name (built with ``encoder_kwargs``).
        views: how positives are made: a pair maker ``views(x, generator) -> (x1, x2)``
            (``nearfar.views.TwoViews``) or a pipeline ``views(x, generator) -> x``
            (``nearfar.views.Compose``, drawn twice); None uses
            ``nearfar.views.default_mnist_views()``.
        temperature: NT-Xent temperature (> 0).
        hidden_dim, out_dim, num_layers: the projection head (Linear-BN-ReLU-Linear).
        keep_head: when True, :meth:`embed` returns the projection instead of the
            encoder features (SimCLR drops the head downstream; the default).
        encoder_kwargs: constructor keywords when ``encoder`` is a name.
        seed: seeds the views when no generator is passed to :meth:`loss`.
        tile: rows per tile for the exact memory-linear NT-Xent path (None: automatic).
        loss: "nt_xent"; "debiased" (Chuang et al., 2020: the negative term corrected
            for a class prior ``tau_plus``) or "hard_negative" (Robinson et al., 2021:
            also weighted towards hard negatives by ``beta``).
        tau_plus, beta: of the debiased / hard-negative losses.
        exclude_same_label: drop same-label pairs from the negatives (needs labels; for
            (semi-)supervised runs and false-negative studies).
        exclude_same_group: drop pairs with the same ``batch["group"]`` (per-item
            extras, e.g. duplicate-cluster or source ids) from the negatives.
        grad_cache_chunk: embed the 2B views this many at a time with cached gradients
            (GradCache, Gao et al., 2021): the same loss, encoder memory of one chunk;
            BatchNorm statistics per chunk. None (default) embeds all at once.
        gather, local_loss: under ``torchrun``, NT-Xent against every process's views
            (:mod:`nearfar.methods.processes`). The debiased / hard-negative losses and
            the exclusion masks stay within each process's batch.
    """

    name = "simclr"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None, *,
                 temperature: float = 0.5, hidden_dim: int = 512, out_dim: int = 128,
                 num_layers: int = 2, keep_head: bool = False,
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 tile: int | None = None, loss: str = "nt_xent", tau_plus: float = 0.1,
                 beta: float = 1.0, exclude_same_label: bool = False,
                 exclude_same_group: bool = False, grad_cache_chunk: int | None = None,
                 gather: bool | None = None, local_loss: bool = False) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        self.loss_name, self.tau_plus, self.beta = loss, float(tau_plus), float(beta)
        self.exclude_same_label = bool(exclude_same_label)
        self.exclude_same_group = bool(exclude_same_group)
        self.gather, self.local_loss = check_gather_option(gather), check_local_loss(local_loss)
        self.head = ProjectionHead(self.feature_dim, hidden_dim, out_dim, num_layers=num_layers)
        self.temperature = float(temperature)
        self.keep_head = bool(keep_head)
        self.tile = tile

    def embed(self, x: Tensor) -> Tensor:
        h = self.encode(x)
        return self.head(h) if self.keep_head else h

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        _, v1, v2 = self.draw_views(batch, generator)
        # one forward over both views: same BatchNorm statistics for both, one big conv
        z = self.embed_views(lambda v: self.head(self.encode(v)), torch.cat([v1, v2])).float()
        z1, z2 = z.chunk(2)
        exclude = self._exclusion(batch, len(z1), z.device)
        if self.loss_name != "nt_xent":
            loss = hard_negative_info_nce(
                z1, z2, temperature=self.temperature, tau_plus=self.tau_plus,
                beta=self.beta if self.loss_name == "hard_negative" else 0.0, exclude=exclude)
        elif exclude is not None:
            loss = info_nce(z, z, partner_index(len(z1), device=z.device), exclude=exclude,
                            temperature=self.temperature, tile=self.tile)
        else:
            # under torch.distributed (gather None = automatic), negatives from every rank
            loss = nt_xent(z1, z2, temperature=self.temperature, tile=self.tile,
                           gather=resolve_gather(self.gather), local_loss=self.local_loss)
        with torch.no_grad():
            metrics = {"positive_cosine": F.cosine_similarity(z1, z2, dim=1).mean()}
            labels = batch.get("labels")
            if isinstance(labels, Tensor):
                # share of the scored negatives that carry the anchor's label
                own = torch.arange(len(z1), device=z.device).repeat(2)
                negatives = own[:, None] != own[None, :]
                if exclude is not None:
                    negatives &= ~exclude
                lab = labels.repeat(2)
                metrics["false_negative_rate"] = false_negative_rate(lab, lab,
                                                                     negatives=negatives)
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())

    def _exclusion(self, batch: dict[str, Any], n: int, device: torch.device) -> Tensor | None:
        """(2N, 2N) known false negatives (same label / same group), or None."""
        from nearfar.data.samplers import two_view_exclusion

        mask = None
        for wanted, key in ((self.exclude_same_label, "labels"),
                            (self.exclude_same_group, "group")):
            if not wanted:
                continue
            ids = batch.get(key)
            if not isinstance(ids, Tensor) or ids.shape != (n,):
                raise ValueError(f"batch[{key!r}]: expected ({n},) integer ids for "
                                 f"exclude_same_{key.rstrip('s')}, got "
                                 f"{getattr(ids, 'shape', ids)!r}")
            m = two_view_exclusion(ids.to(device))
            mask = m if mask is None else mask | m
        return mask

    def describe(self) -> dict[str, Any]:
        n = self.batch_size
        return {
            "method": "simclr",
            "reference": "Chen et al., 2020",
            "objective": {
                "loss": self.loss_name,
                "temperature": self.temperature,
                **({} if self.loss_name == "nt_xent" else {"tau_plus": self.tau_plus}),
                **({"beta": self.beta} if self.loss_name == "hard_negative" else {}),
                "projection_head": {
                    "in_dim": self.head.in_dim,
                    "out_dim": self.head.out_dim,
                    "layers": sum(isinstance(m, nn.Linear) for m in self.head.modules()),
                },
                "head_downstream": "kept" if self.keep_head else "dropped",
            },
            "positives": {
                "construction": "two independent random views of the same image",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "in-batch",
                "batch_size": n,
                "per_anchor": None if n is None else 2 * n - 2,
                "exclusions": ["the anchor itself", "its partner view (the positive)"]
                + (["same-label items"] if self.exclude_same_label else [])
                + (["same-group items (batch['group'])"] if self.exclude_same_group else []),
                "processes": processes_card(self.gather, self.local_loss),
            },
            "modality": self.modality,
            "encoder": self.encoder_card(),
        }
