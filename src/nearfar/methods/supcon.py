"""Supervised contrastive learning (Khosla et al., 2020), and a mixed objective for
partly labelled data.

``supcon``: every view of every image with the anchor's label is a positive, every view
with another label a negative. ``supcon_mixed``: NT-Xent (SimCLR) on all items plus
``supervised_weight`` times SupCon on the labelled ones (label -1 = unlabelled).

Many processes (``gather``, see ``nearfar.methods.processes``): views and labels of every
rank are gathered, so positives and negatives come from the global batch. SupConMixed's
supervised term takes the labelled rows of the gathered batch (their number differs
between ranks) and is computed whole on every rank; its NT-Xent term follows
``local_loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar import distributed
from nearfar.losses import nt_xent, supcon
from nearfar.methods.base import StepOutput
from nearfar.methods.metrics import in_batch_false_negative_rate
from nearfar.methods.processes import (
    check_gather_option,
    check_local_loss,
    gathering,
    processes_card,
)
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import TwoViewMethod, batch_labels, check_number, head_card
from nearfar.nn import ProjectionHead


def _labels_or_error(batch: dict[str, Any], method: str, alternative: str) -> Tensor:
    labels = batch_labels(batch)
    if labels is None:
        raise ValueError(
            f"{method}: the batch has no labels (batch['labels'] is None): this dataset is "
            f"unlabelled, and {method} takes its positives from labels; label the data (an "
            f"image folder with one sub-folder per class, or a manifest with a label column) "
            f"or use {alternative}")
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"batch['labels']: expected a 1-D integer tensor, got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    return labels


class _SupConBase(TwoViewMethod):
    def __init__(self, encoder: nn.Module | str, views: Callable | None, *, temperature: float,
                 hidden_dim: int, out_dim: int, num_layers: int,
                 encoder_kwargs: Mapping[str, Any] | None, seed: int,
                 tile: int | None, gather: bool | None = None,
                 local_loss: bool = False, grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        self.gather = check_gather_option(gather)
        self.local_loss = check_local_loss(local_loss)
        self.temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
        self.head = ProjectionHead(self.feature_dim, hidden_dim, out_dim, num_layers=num_layers)
        self.tile = tile

    def _project(self, batch: dict[str, Any], generator: torch.Generator | None
                 ) -> tuple[Tensor, Tensor]:
        _, v1, v2 = self.draw_views(batch, generator)
        z = self.embed_views(lambda v: self.head(self.encode(v)), torch.cat([v1, v2])).float()
        return z.chunk(2)

    def _objective_card(self, loss: str) -> dict[str, Any]:
        return {"loss": loss, "temperature": self.temperature,
                "projection_head": head_card(self.head), "head_downstream": "dropped"}


@register_method("supcon")
class SupCon(_SupConBase):
    """Backbone + projection head; SupCon over both views of every labelled image.

    Args:
        encoder, views, encoder_kwargs, seed, tile: as :class:`~nearfar.methods.SimCLR`.
        temperature: > 0 (SupCon: 0.1).
        hidden_dim, out_dim, num_layers: the projection head.
        gather: positives and negatives from every process's batch (None: when
            torch.distributed runs with world size > 1).
        local_loss: with gather, each rank scores only its own views as anchors (the
            same gradient, less work per rank).
        grad_cache_chunk: embed the 2B views this many at a time with cached gradients
            (GradCache, Gao et al., 2021): the same loss over the whole batch, encoder
            memory of one chunk; BatchNorm statistics per chunk. None (default) embeds
            all at once.

    Every batch must carry labels (``batch["labels"]``, no -1): a clear error otherwise.
    """

    name = "supcon"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, temperature: float = 0.1, hidden_dim: int = 512, out_dim: int = 128,
                 num_layers: int = 2, encoder_kwargs: Mapping[str, Any] | None = None,
                 seed: int = 0, tile: int | None = None, gather: bool | None = None,
                 local_loss: bool = False, grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, temperature=temperature, hidden_dim=hidden_dim,
                         out_dim=out_dim, num_layers=num_layers, encoder_kwargs=encoder_kwargs,
                         seed=seed, tile=tile, gather=gather, local_loss=local_loss,
                         grad_cache_chunk=grad_cache_chunk)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        labels = _labels_or_error(batch, "supcon", "'supcon_mixed' for partly labelled data "
                                  "or an unsupervised method such as 'simclr'")
        if bool((labels < 0).any()):
            raise ValueError("supcon: the batch has unlabelled items (label -1); use "
                             "'supcon_mixed' for partly labelled data")
        z1, z2 = self._project(batch, generator)
        loss = supcon(torch.cat([z1, z2]), labels.repeat(2), temperature=self.temperature,
                      tile=self.tile, gather=gathering(self.gather),
                      local_loss=self.local_loss)
        with torch.no_grad():
            metrics = {"positive_cosine": F.cosine_similarity(z1, z2, dim=1).mean()}
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())

    def describe(self) -> dict[str, Any]:
        n = self.batch_size
        return {
            "method": "supcon",
            "reference": "Khosla et al., 2020",
            "objective": self._objective_card("supcon (L_out: mean -log softmax over all "
                                              "same-label views)"),
            "positives": {
                "construction": "every view of every image in the batch with the anchor's "
                                "label, including its own other view (labels define "
                                "positives)",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "in-batch",
                "construction": "the views of the batch's images with another label",
                "batch_size": n,
                "per_anchor": "2N - 1 - (same-label views)" if n is None else
                              f"{2 * n - 1} minus the same-label views",
                "exclusions": ["the anchor itself", "every same-label view (positives)"],
                "processes": processes_card(self.gather, self.local_loss),
            },
            "modality": self.modality,
            "supervision": "labels required for every item",
            "encoder": self.encoder_card(),
        }


@register_method("supcon_mixed")
class SupConMixed(_SupConBase):
    """NT-Xent on every item + ``supervised_weight`` x SupCon on the labelled ones.

    Args:
        encoder, views, encoder_kwargs, seed, tile: as :class:`~nearfar.methods.SimCLR`.
        temperature: of both terms (> 0).
        supervised_weight: >= 0, weight of the SupCon term (0: plain SimCLR).
        labelled_fraction: in (0, 1]: keep the labels of only this share of the items
            (a fixed pseudo-random subset chosen from the item index and ``seed``), the
            rest count as unlabelled; to study partly labelled training on a fully
            labelled dataset. 1.0 keeps every label the data has.
        hidden_dim, out_dim, num_layers: the projection head.
        gather, local_loss: as :class:`SupCon` (``local_loss`` applies to the NT-Xent
            term; the supervised term is computed whole on every rank).
        grad_cache_chunk: embed the 2B views this many at a time with cached gradients
            (GradCache, Gao et al., 2021): the same loss over the whole batch, encoder
            memory of one chunk; BatchNorm statistics per chunk. None (default) embeds
            all at once.

    Labels of -1 mark unlabelled items; a batch without any labels at all is an error
    (use ``simclr``).
    """

    name = "supcon_mixed"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, temperature: float = 0.2, supervised_weight: float = 1.0,
                 labelled_fraction: float = 1.0, hidden_dim: int = 512, out_dim: int = 128,
                 num_layers: int = 2, encoder_kwargs: Mapping[str, Any] | None = None,
                 seed: int = 0, tile: int | None = None, gather: bool | None = None,
                 local_loss: bool = False, grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, temperature=temperature, hidden_dim=hidden_dim,
                         out_dim=out_dim, num_layers=num_layers, encoder_kwargs=encoder_kwargs,
                         seed=seed, tile=tile, gather=gather, local_loss=local_loss,
                         grad_cache_chunk=grad_cache_chunk)
        self.supervised_weight = check_number(supervised_weight, "supervised_weight", low=0.0)
        self.labelled_fraction = check_number(labelled_fraction, "labelled_fraction", low=0.0,
                                              high=1.0, low_open=True)

    def visible_labels(self, labels: Tensor, index: Tensor | None) -> Tensor:
        """The labels the objective sees: -1 for items outside the labelled fraction."""
        if self.labelled_fraction >= 1.0:
            return labels
        if index is None:
            raise ValueError("supcon_mixed: labelled_fraction < 1 needs batch['index'] to pick "
                             "the labelled items")
        # a fixed subset of items: a multiplicative hash of (index, seed) mod 2^20
        h = (index.long() * 2654435761 + self.seed * 97531) % (1 << 20)
        keep = h.double() < self.labelled_fraction * (1 << 20)
        return torch.where(keep.to(labels.device), labels, torch.full_like(labels, -1))

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        labels = _labels_or_error(batch, "supcon_mixed", "an unsupervised method such as "
                                  "'simclr'")
        index = batch.get("index") if isinstance(batch.get("index"), Tensor) else None
        labels = self.visible_labels(labels, index)
        z1, z2 = self._project(batch, generator)
        gather = gathering(self.gather)
        unsupervised = nt_xent(z1, z2, temperature=self.temperature, tile=self.tile,
                               gather=gather, local_loss=self.local_loss)
        labelled = labels >= 0
        n_labelled = int(labelled.sum())
        z, both_labels = torch.cat([z1, z2]), labels.repeat(2)
        if gather and self.supervised_weight > 0:
            # ranks hold different numbers of labelled items: gather every row (equal
            # sizes), then keep the labelled ones of the global batch; every rank takes
            # this branch, so the collectives stay in step
            z = distributed.all_gather_with_grad(z)
            both_labels = distributed.all_gather_no_grad(both_labels)
        keep = both_labels >= 0
        if bool(keep.any()) and self.supervised_weight > 0:
            supervised = supcon(z[keep], both_labels[keep], temperature=self.temperature,
                                tile=self.tile)
        else:
            supervised = z1.new_zeros(())
        loss = unsupervised + self.supervised_weight * supervised
        metrics: dict[str, float | Tensor] = {
            "nt_xent": unsupervised.detach(), "supcon": supervised.detach(),
            "labelled_share": n_labelled / labels.shape[0],
        }
        with torch.no_grad():
            metrics["positive_cosine"] = F.cosine_similarity(z1, z2, dim=1).mean()
            # of the NT-Xent term's negatives, the share with the anchor's (known) label
            fnr = in_batch_false_negative_rate(batch_labels(batch))
            if fnr is not None:
                metrics["false_negative_rate"] = fnr
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())

    def describe(self) -> dict[str, Any]:
        n = self.batch_size
        return {
            "method": "supcon_mixed",
            "reference": "Chen et al., 2020 (NT-Xent) + Khosla et al., 2020 (SupCon)",
            "objective": {
                **self._objective_card(f"nt_xent over all items + {self.supervised_weight:g} "
                                       f"x supcon over the labelled items"),
                "supervised_weight": self.supervised_weight,
                "labelled_fraction": self.labelled_fraction,
            },
            "positives": {
                "construction": "NT-Xent term: the other view of the same image; SupCon term "
                                "(labelled items only): every view with the anchor's label",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "in-batch",
                "construction": "NT-Xent term: all other views of the batch (same-label ones "
                                "included); SupCon term: labelled views with another label",
                "batch_size": n,
                "per_anchor": None if n is None else 2 * n - 2,
                "exclusions": ["the anchor itself", "its partner view (the positive)",
                               "SupCon term: same-label views (positives)"],
                "processes": processes_card(self.gather, self.local_loss),
            },
            "modality": self.modality,
            "supervision": "partial: label -1 marks an unlabelled item",
            "encoder": self.encoder_card(),
        }
