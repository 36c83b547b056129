"""MoCo v2 (He et al., 2020; Chen et al., 2020) and MoCo v3 (Chen, Xie & He, 2021).

MoCo v2: a query encoder (backbone + MLP head) and its momentum copy, the key encoder.
Each query must pick out the key of its own image's other view against a queue of K
keys from earlier batches. MoCo v3: no queue; the query branch gets a predictor, and
each query picks out its key among the N keys of the batch (symmetrised over the two
views, scaled by 2 * temperature). Both move the key encoder along the cosine momentum
schedule in :meth:`after_step`.

Many processes (``gather``, see ``nearfar.methods.processes``): MoCo v2's loss is a mean
of per-query terms against a queue every rank holds identically (each step enqueues every
rank's keys, in rank order), so DDP's averaging already gives the global gradient. MoCo
v3 gathers the momentum keys of every rank (no gradient: they come from the momentum
encoder), each query's key sitting at ``rank_offset + i``, as the reference code does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar import distributed
from nearfar.losses import info_nce, moco_loss
from nearfar.methods.base import StepOutput
from nearfar.methods.metrics import cross_false_negative_rate, false_negative_rate
from nearfar.methods.processes import (
    check_gather_option,
    check_local_loss,
    gathering,
    processes_card,
)
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import (
    TwoViewMethod,
    batch_labels,
    check_int,
    check_number,
    head_card,
)
from nearfar.nn import ProjectionHead
from nearfar.nn.momentum import EMA
from nearfar.nn.predictor import PredictionHead
from nearfar.nn.queue import Queue


def _momentum_card(ema: EMA) -> dict[str, Any]:
    return {"base": ema.base_momentum, "schedule": ema.schedule,
            "final": 1.0 if ema.schedule == "cosine" else ema.base_momentum}


@register_method("moco_v2")
class MoCoV2(TwoViewMethod):
    """Query encoder + MLP head, momentum key encoder, a queue of K negative keys.

    Args:
        encoder, views, encoder_kwargs, seed: as :class:`~nearfar.methods.SimCLR`.
        temperature: InfoNCE temperature (> 0; MoCo v2: 0.2).
        queue_size: K, negative keys kept (MoCo: 65536; keep K below the dataset size
            times a few epochs' worth so that keys are not too stale).
        hidden_dim, out_dim: the 2-layer MLP head (Linear-ReLU-Linear).
        head_batch_norm: BatchNorm after the head's hidden layer. MoCo v2's head has none
            (False); with the small encoders used here the head learns much faster with
            it (on MNIST-5k the loss barely leaves log K for hundreds of steps without),
            hence the default True.
        base_momentum: key encoder momentum at the start (in [0, 1]).
        momentum_schedule: "cosine" (from base_momentum to 1.0 over training, as MoCo
            v3 / BYOL) or "constant" (MoCo v2's original: 0.999 throughout).
        exclude_same_item: leave out of the denominator the queued keys of the very
            items in the batch (stale keys of the same image from an earlier epoch,
            which a queue longer than an epoch always holds).
        tile: rows per tile of the exact memory-linear path (None: automatic).
        gather: enqueue every process's keys (None: when torch.distributed runs with
            world size > 1), so all ranks share one queue; see the module docstring.
        grad_cache_chunk: run the query branch (encoder + head) over the B query views
            this many at a time with cached gradients (GradCache, Gao et al., 2021): the
            same loss, query activation memory of one chunk; BatchNorm statistics per
            chunk. The key encoder runs under no_grad on all keys at once. None (default)
            embeds all at once.
    """

    name = "moco_v2"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, temperature: float = 0.2, queue_size: int = 4096, hidden_dim: int = 512,
                 out_dim: int = 128, head_batch_norm: bool = True, base_momentum: float = 0.99,
                 momentum_schedule: str = "cosine", exclude_same_item: bool = True,
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 tile: int | None = None, gather: bool | None = None,
                 grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        self.temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
        self.gather = check_gather_option(gather)
        check_int(queue_size, "queue_size")
        self.head = ProjectionHead(self.feature_dim, hidden_dim, out_dim, num_layers=2,
                                   batch_norm=bool(head_batch_norm))
        self.key_encoder = EMA(self._online(), base_momentum, schedule=momentum_schedule)
        self.queue = Queue(queue_size, out_dim, track_labels=True, track_ids=True,
                           init="random", seed=seed)
        self.exclude_same_item = bool(exclude_same_item)
        self.tile = tile

    def _online(self) -> nn.Module:
        return nn.Sequential(self.encoder, self.head)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        _, v1, v2 = self.draw_views(batch, generator)
        q = self.embed_views(lambda v: self.head(self.encode(v)), v1).float()
        with torch.no_grad():
            k = F.normalize(self.key_encoder(v2.contiguous(memory_format=self.memory_format))
                            .float(), dim=1)
        # negatives: keys of earlier batches only; this batch's keys are its positives
        negatives = self.queue.get().to(q.device)
        labels = batch_labels(batch)
        ids = batch.get("index") if isinstance(batch.get("index"), Tensor) else None
        exclude = None
        if self.exclude_same_item and ids is not None:
            exclude = self.queue.same_item_mask(ids)
            if exclude is not None and not bool(exclude.any()):
                exclude = None
        if exclude is None:
            loss = moco_loss(q, k, negatives, temperature=self.temperature, tile=self.tile)
        else:
            loss = moco_loss_excluding(q, k, negatives, exclude, temperature=self.temperature,
                                       tile=self.tile)
        metrics: dict[str, float | Tensor] = {"momentum": self.key_encoder.last_momentum.clone()}
        with torch.no_grad():
            metrics["positive_cosine"] = F.cosine_similarity(q, k, dim=1).mean()
            metrics["same_item_in_queue"] = (0.0 if exclude is None
                                             else exclude.sum(1).float().mean())
            fnr = false_negative_rate(labels, self.queue.get_labels(),
                                      negatives=None if exclude is None else ~exclude)
            if fnr is not None:
                metrics["false_negative_rate"] = fnr
        if self.training:
            # every rank's keys in rank order: the queues of all ranks stay identical
            self.queue.enqueue(k, labels, ids, gather=gathering(self.gather))
        return StepOutput(loss=loss, metrics=metrics, embeddings=q.detach())

    def after_step(self, progress: float) -> None:
        self.key_encoder.update(self._online(), progress)

    def describe(self) -> dict[str, Any]:
        k = self.queue.size
        return {
            "method": "moco_v2",
            "reference": "He et al., 2020; Chen et al., 2020 (MoCo v2)",
            "objective": {
                "loss": "moco_loss (InfoNCE of each query against its key and the queue)",
                "temperature": self.temperature,
                "projection_head": head_card(self.head),
                "key_encoder": {"kind": "momentum copy of encoder + head",
                                "momentum": _momentum_card(self.key_encoder)},
                "head_downstream": "dropped",
            },
            "positives": {
                "construction": "two random views of the same image: the query encoder sees "
                                "one, the momentum key encoder the other",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "queue",
                "construction": f"queue of K={k} momentum-encoded keys from earlier batches "
                                "(this batch's keys are enqueued only after scoring)",
                "queue_size": k,
                "batch_size": self.batch_size,
                "per_anchor": k,
                "exclusions": (["the anchor's own key (it is the positive)",
                                "other keys of the current batch"]
                               + (["queued keys of the same item (stale keys from an earlier "
                                   "epoch)"] if self.exclude_same_item else [])),
                "processes": processes_card(self.gather),
            },
            "modality": self.modality,
            "encoder": self.encoder_card(),
        }


def moco_loss_excluding(q: Tensor, k: Tensor, queue: Tensor, exclude: Tensor, *,
                        temperature: float, tile: int | None = None) -> Tensor:
    """:func:`~nearfar.losses.moco_loss` with some (query, queued key) pairs left out.

    The general form over candidates [k; queue]: query i's positive is k_i, the other
    keys of the batch are never scored (as in MoCo), nor the queued keys marked in
    ``exclude`` (N, K). Equals ``moco_loss`` when nothing is excluded.
    """
    n = q.shape[0]
    others = ~torch.eye(n, dtype=torch.bool, device=q.device)
    mask = torch.cat([others, exclude.to(q.device)], dim=1)
    candidates = torch.cat([k.detach(), queue.detach()])
    return info_nce(q, candidates, torch.arange(n, device=q.device), exclude=mask,
                    temperature=temperature, tile=tile)


def key_contrast(q: Tensor, k: Tensor, *, temperature: float | Tensor, tile: int | None = None,
                 gather: bool = False, local_loss: bool = False) -> Tensor:
    """InfoNCE of queries against in-batch keys (MoCo v3, before its 2 * temperature
    scale): query i picks out key i among the keys; the keys are momentum-encoder outputs,
    detached here.

    ``gather`` (under ``torch.distributed``): the keys of every rank are gathered (no
    gradient), query i of this rank picking out key ``rank_offset + i``. With
    ``local_loss`` each rank scores its own N queries (the reference code: a mean over
    the local queries, whose mean over ranks is the global loss); without it the
    queries are gathered too, with gradients, and every rank computes the loss of one
    process on the concatenated batch.
    """
    k = k.detach()
    if not distributed.resolve_gather(gather):
        return info_nce(q, k, torch.arange(q.shape[0], device=q.device),
                        temperature=temperature, tile=tile)
    n = q.shape[0]
    keys = distributed.all_gather_no_grad(k)
    if local_loss:
        index = torch.arange(n, device=q.device) + distributed.gathered_offset(n, True)
    else:
        q = distributed.all_gather_with_grad(q)
        index = torch.arange(q.shape[0], device=q.device)
    return info_nce(q, keys, index, temperature=temperature, tile=tile)


@register_method("moco_v3")
class MoCoV3(TwoViewMethod):
    """Backbone + 3-layer projector + predictor, momentum copy of backbone + projector,
    symmetric in-batch InfoNCE between queries and momentum keys (no queue).

    Args:
        encoder, views, encoder_kwargs, seed: as :class:`~nearfar.methods.SimCLR`.
        temperature: > 0 (MoCo v3: 0.2 for ViT, 1.0 for ResNet; the loss is scaled by
            2 * temperature, as the reference code).
        hidden_dim, out_dim: the 3-layer projector (Linear-BN-ReLU x2, Linear).
        predictor_hidden_dim: hidden width of the 2-layer predictor.
        base_momentum, momentum_schedule: the momentum encoder's (MoCo v3: 0.99, cosine
            to 1).
        tile: as :class:`MoCoV2`.
        gather: contrast each query with the keys of every process (None: when
            torch.distributed runs with world size > 1).
        local_loss: with gather, each rank scores only its own queries (the reference
            MoCo v3); False scores every rank's queries on every rank (same gradient,
            the same loss value on every rank).
        grad_cache_chunk: run the query branch (encoder, projector, predictor) over the
            2B views this many at a time with cached gradients (GradCache, Gao et al.,
            2021): the same loss, query activation memory of one chunk; BatchNorm
            statistics per chunk. The momentum encoder runs under no_grad on all views at
            once. None (default) embeds all at once.
    """

    name = "moco_v3"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, temperature: float = 0.2, hidden_dim: int = 512, out_dim: int = 128,
                 predictor_hidden_dim: int = 512, base_momentum: float = 0.99,
                 momentum_schedule: str = "cosine",
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 tile: int | None = None, gather: bool | None = None,
                 local_loss: bool = False, grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        self.temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
        self.gather = check_gather_option(gather)
        self.local_loss = check_local_loss(local_loss)
        self.projector = ProjectionHead(self.feature_dim, hidden_dim, out_dim, num_layers=3)
        self.predictor = PredictionHead(out_dim, predictor_hidden_dim)
        self.momentum_encoder = EMA(self._online(), base_momentum, schedule=momentum_schedule)
        self.tile = tile

    def _online(self) -> nn.Module:
        return nn.Sequential(self.encoder, self.projector)

    def _contrast(self, q: Tensor, k: Tensor) -> Tensor:
        loss = key_contrast(q, k, temperature=self.temperature, tile=self.tile,
                            gather=gathering(self.gather), local_loss=self.local_loss)
        return loss * (2.0 * self.temperature)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        _, v1, v2 = self.draw_views(batch, generator)
        views = torch.cat([v1, v2]).contiguous(memory_format=self.memory_format)
        q1, q2 = self.embed_views(lambda v: self.predictor(self.projector(self.encode(v))),
                                  views).float().chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_encoder(views).float().chunk(2)
        loss = self._contrast(q1, k2) + self._contrast(q2, k1)
        metrics: dict[str, float | Tensor] = {
            "momentum": self.momentum_encoder.last_momentum.clone()}
        with torch.no_grad():
            metrics["positive_cosine"] = (F.cosine_similarity(q1, k2, dim=1).mean()
                                          + F.cosine_similarity(q2, k1, dim=1).mean()) / 2
            fnr = cross_false_negative_rate(batch_labels(batch))
            if fnr is not None:
                metrics["false_negative_rate"] = fnr
        return StepOutput(loss=loss, metrics=metrics, embeddings=q1.detach())

    def after_step(self, progress: float) -> None:
        self.momentum_encoder.update(self._online(), progress)

    def describe(self) -> dict[str, Any]:
        n = self.batch_size
        return {
            "method": "moco_v3",
            "reference": "Chen, Xie & He, 2021 (MoCo v3)",
            "objective": {
                "loss": "symmetric InfoNCE between predictor queries and momentum keys, "
                        "scaled by 2 * temperature",
                "temperature": self.temperature,
                "projection_head": head_card(self.projector),
                "predictor": head_card(self.predictor),
                "key_encoder": {"kind": "momentum copy of encoder + projector",
                                "momentum": _momentum_card(self.momentum_encoder)},
                "head_downstream": "dropped",
            },
            "positives": {
                "construction": "two random views of the same image: the query of one view "
                                "against the momentum key of the other, both ways",
                "views": self.views_card(),
            },
            "negatives": {
                "source": "in-batch",
                "construction": "the momentum keys of the other images in the batch",
                "batch_size": n,
                "per_anchor": None if n is None else n - 1,
                "exclusions": ["the anchor's own key (it is the positive)"],
                "processes": processes_card(self.gather, self.local_loss),
            },
            "modality": self.modality,
            "encoder": self.encoder_card(),
        }
