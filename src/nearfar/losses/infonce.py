"""The InfoNCE family: one general form, `info_nce`, and the field's named special cases.

`info_nce` is the only place the numerics live. For each anchor i it is

    loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a not excluded} exp(s_ia) ),

s_ij = sim(anchor_i, candidate_j) / temperature: the "L_out" supervised form of Khosla et
al. (2020), which is the InfoNCE of van den Oord et al. (2018) when |P(i)| = 1. `nt_xent`,
`clip_loss`, `supcon`, `moco_loss` and `cpc_loss` are a few lines each over it.

Two exact paths compute it. The full path builds the N x M score matrix and lets autograd
do the rest; the tiled path (`nearfar.losses.tiled`) never holds that matrix, so memory grows
linearly with the batch (values and gradients agree to ~1e-7 relative in float32, ~1e-15 in
float64). `tile=None` takes the tiled path when N * M > `AUTO_TILE_ABOVE`, `tile=0` forces
the full matrix, `tile=k` uses k x k tiles. One tensor on both sides (nt_xent, supcon) and
CLIP's two directions reuse every tile twice.

Many processes (``torch.distributed``): `nt_xent`, `clip_loss` and `supcon` take
``gather`` and ``local_loss``. ``gather=True`` gathers every rank's rows with gradients
(`nearfar.distributed.all_gather_with_grad`: one all-gather whose backward sums the
gradient over ranks), so the loss is that of one process on the concatenated batch;
every rank must pass the same number of rows. ``local_loss=False`` computes that whole
loss on every rank (the same value everywhere); ``local_loss=True`` scores only this
rank's anchors against every rank's candidates (positives and the excluded self moved
by ``rank_offset``), a mean over the local anchors: the mean over ranks is the global
loss. Either way the gradient DDP averages over ranks is exactly the gradient of the
one-process loss. Outside a process group (or a world of one) both keywords are no-ops.

Why the threshold is low (2-core Xeon VM shared with other jobs, torch 2.13 CPU, float32,
D = 128, nt_xent forward + backward, one intra-op thread; fresh process per cell, median of 3:
``python benchmarks/loss_memory.py --sizes 2048,8192,16384 --impls auto,full --threads 1``):

    2N       tiled (auto)          full (tile=0)        time ratio
    2,048    77 ms / 0.02 GiB      97 ms / 0.08 GiB     0.80x
    8,192    0.73 s / 0.05 GiB     2.01 s / 0.79 GiB    0.36x
    16,384   2.25 s / 0.08 GiB     8.52 s / 3.03 GiB    0.26x
    65,536   ~45 s / 0.54 GiB         would need ~51 GiB

(memory: peak RSS increase over the inputs; the 65,536 row is the whole process's peak RSS,
one run, /usr/bin/time). Both paths cost the same at 2N = 512; the
tiled one wins from 2N = 1024 on (interleaved runs, min of 15: 23 vs 24 ms at 1024, 31 vs 61 ms
at 2048). With two threads on this oversubscribed VM every timing is dominated by OpenMP
spin-waiting (set OMP_WAIT_POLICY=PASSIVE or one thread to measure).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (
    check_choice,
    check_embeddings,
    check_finite,
    check_index,
    check_labels,
    check_like,
    check_mask,
    check_number,
    check_pair,
    check_positive_scalar,
    check_steps,
    check_tensor,
    check_tile_size,
)
from .collective import all_gather_rows, all_gather_rows_no_grad, check_gather, gathered_offset
from .temperature import CLIP_MAX_SCALE, LogitScale
from .tiled import (
    TilePlan,
    count_tile_positives,
    default_tile,
    tiled_info_nce,
    tiled_logsumexp_both_ways,
)

SELF = "self"
SIMILARITIES = ("cosine", "dot")

# Above this many anchor x candidate scores, tile=None takes the tiled path.
AUTO_TILE_ABOVE = 512 * 512


# --------------------------------------------------------------------------- the general form


def info_nce(anchors: Tensor, candidates: Tensor, positives: Tensor, *,
             exclude: str | Tensor | None = None, temperature: float | Tensor = 0.1,
             similarity: str = "cosine", tile: int | None = None) -> Tensor:
    """InfoNCE with one or several positives per anchor (van den Oord et al., 2018;
    Khosla et al., 2020, the "L_out" form).

    Each anchor must pick out its positives among all non-excluded candidates.

    Args:
        anchors: (N, D).
        candidates: (M, D), M >= 2; may be the very same tensor as anchors.
        positives: integer (N,) index of each anchor's positive column, or a boolean (N, M)
            mask (several positives per anchor; the loss averages -log softmax over them).
        exclude: None; "self" (anchor i never scores candidate i; needs N <= M, for anchors
            and candidates drawn from the same set); or a boolean (N, M) mask of pairs never
            scored (known duplicates, false negatives). Excluded pairs leave the denominator
            and are never positives.
        temperature: > 0, a number or a scalar tensor (learnable: gradients reach it).
        similarity: "cosine" (both sides L2-normalised here) or "dot".
        tile: None takes the exact memory-linear tiled path when N * M > AUTO_TILE_ABOVE
            (512 * 512); 0 forces the full N x M matrix; k > 0 uses k x k tiles. Passing
            the same tensor as anchors and candidates lets the tiled path use each tile
            twice.

    Returns:
        Scalar loss, the mean over the N anchors.

    Raises:
        ValueError: on malformed input, or when an anchor is left without any positive
            (a silent drop would hide a broken batch).
    """
    anchors = check_embeddings(anchors, "anchors")
    candidates = check_embeddings(candidates, "candidates", min_rows=2)
    check_like(candidates, anchors, "candidates", "anchors", same_rows=False)
    check_choice(similarity, "similarity", SIMILARITIES)
    check_tile_size(tile)
    n, m, device = anchors.shape[0], candidates.shape[0], anchors.device
    exclude_self, exclude_mask = _check_exclude(exclude, n, m, device)
    index, mask = _check_positives(positives, n, m, device)
    scale = _inverse_temperature(temperature, anchors)
    a = _embed(anchors, similarity)
    c = a if candidates is anchors else _embed(candidates, similarity)
    return _contrast(a, c, scale, index=index, mask=mask, exclude_self=exclude_self,
                     exclude_mask=exclude_mask, tile=tile).mean()


def partner_index(n: int, *, device: torch.device | str | None = None) -> Tensor:
    """(2n,) int64: the partner of view i is view i + n and vice versa, for two views of n
    items stacked as [view 1; view 2]."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    i = torch.arange(n, device=device)
    return torch.cat([i + n, i])


# --------------------------------------------------------------------------- special cases


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float | Tensor = 0.5,
            tile: int | None = None, gather: bool = False, local_loss: bool = False) -> Tensor:
    """NT-Xent, the SimCLR objective (Chen et al., 2020).

    Each of the 2N views must pick out its partner among the other 2N - 1.

    Args:
        z1, z2: (N, D) embeddings of two views of the same N items; row i of z1 and row i
            of z2 are the positive pair. Cosine similarity.
        temperature: > 0 (number or learnable scalar tensor).
        tile: as in `info_nce`; with ``gather`` the tiles run over the gathered candidates.
        gather: under ``torch.distributed``, the 2N views of every rank are the anchors'
            candidates (the module docstring): the loss of one process on the
            concatenated batch, every view picking out its partner among the 2WN - 1
            others.
        local_loss: with ``gather``, only this rank's 2N views are anchors (scored
            against all 2WN views); the mean over ranks is the global loss.

    Returns:
        Scalar loss, the mean over all 2N anchors (2WN with ``gather``; this rank's 2N
        with ``local_loss``).
    """
    z1, z2 = check_pair(z1, z2, "z1", "z2")
    check_tile_size(tile)
    gathering, local = check_gather(gather, local_loss)
    z = torch.cat([z1, z2])
    if not gathering:
        return info_nce(z, z, partner_index(len(z1), device=z.device), exclude=SELF,
                        temperature=temperature, similarity="cosine", tile=tile)
    # every rank's [z1; z2] block in rank order: views of rank r are rows 2N r .. 2N r + 2N
    n2 = z.shape[0]
    everyone = all_gather_rows(z)
    partner = partner_index(len(z1), device=z.device)
    scale = _inverse_temperature(temperature, z)
    if local:
        offset = gathered_offset(n2, True)
        a, c = _embed(z, "cosine"), _embed(everyone, "cosine")
        return _contrast(a, c, scale, index=partner + offset, exclude_self=True,
                         self_offset=offset, tile=tile).mean()
    blocks = everyone.shape[0] // n2
    starts = torch.arange(blocks, device=z.device) * n2
    index = (starts[:, None] + partner[None, :]).reshape(-1)
    e = _embed(everyone, "cosine")
    return _contrast(e, e, scale, index=index, exclude_self=True, tile=tile).mean()


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor | LogitScale | float, *,
              tile: int | None = None, gather: bool = False,
              local_loss: bool = False) -> Tensor:
    """The symmetric contrastive loss of CLIP (Radford et al., 2021).

    Image i must pick out text i among the N texts, and text i image i among the N images;
    the loss is the mean of the two cross-entropies. Cosine similarity.

    Args:
        image, text: (N, D), N >= 2, row i of each is a matching pair.
        logit_scale: log of the inverse temperature, a learnable scalar tensor (the scale
            used is ``logit_scale.exp().clamp(max=100)``), or a `LogitScale` module.
        tile: as in `info_nce` (each direction is tiled separately).
        gather: under ``torch.distributed``, every rank's pairs are gathered (the module
            docstring): image i picks out text i among all WN texts and vice versa.
        local_loss: with ``gather``, only this rank's images and texts are anchors,
            each scored against all WN of the other side (its match at
            ``rank_offset + i``); the mean over ranks is the global loss (open_clip's
            ``local_loss``).

    Returns:
        Scalar loss.
    """
    image, text = check_pair(image, text, "image", "text", min_rows=2)
    check_tile_size(tile)
    gathering, local = check_gather(gather, local_loss)
    scale = _clip_scale(logit_scale, image)
    if gathering:
        n = image.shape[0]
        everyone = all_gather_rows(torch.stack([image, text], dim=1))   # (WN, 2, D)
        if local:
            index = torch.arange(n, device=image.device) + gathered_offset(n, True)
            all_i, all_t = _embed(everyone[:, 0], "cosine"), _embed(everyone[:, 1], "cosine")
            image_to_text = _contrast(_embed(image, "cosine"), all_t, scale, index=index,
                                      tile=tile)
            text_to_image = _contrast(_embed(text, "cosine"), all_i, scale, index=index,
                                      tile=tile)
            return (image_to_text.mean() + text_to_image.mean()) / 2
        image, text = everyone.unbind(1)
    i, t = _embed(image, "cosine"), _embed(text, "cosine")
    # both directions share one score matrix: -log softmax of the diagonal along its rows
    # (image -> text) and along its columns (text -> image)
    image_to_text, text_to_image = _contrast_both_ways(i, t, scale, tile)
    return (image_to_text.mean() + text_to_image.mean()) / 2


def supcon(z: Tensor, labels: Tensor, *, temperature: float | Tensor = 0.1,
           tile: int | None = None, exclude: Tensor | None = None, gather: bool = False,
           local_loss: bool = False) -> Tensor:
    """Supervised contrastive loss, the "L_out" form (Khosla et al., 2020).

    Every other sample with the anchor's label is a positive; the anchor itself is never
    scored. Cosine similarity.

    Args:
        z: (N, D), all views of all items concatenated, N >= 2.
        labels: (N,) integers.
        temperature: > 0 (number or learnable scalar tensor).
        tile: as in `info_nce`; the tiled path never builds an N x N label mask.
        exclude: None or a boolean (N, N) mask of further pairs never scored (not with
            ``gather``).
        gather: under ``torch.distributed``, every rank's rows and labels are gathered
            (the module docstring): positives and negatives come from the global batch.
        local_loss: with ``gather``, only this rank's rows are anchors (scored against
            all WN rows); the mean over ranks is the global loss.

    Returns:
        Scalar loss, the mean over the N anchors (WN with ``gather``; this rank's N with
        ``local_loss``).

    Raises:
        ValueError: when a label occurs only once (that anchor has no positive).
    """
    z = check_embeddings(z, "z", min_rows=2)
    n = z.shape[0]
    labels = check_labels(labels, "labels", n, z.device)
    check_tile_size(tile)
    gathering, local = check_gather(gather, local_loss)
    if gathering and exclude is not None:
        raise ValueError("exclude: a local (N, N) mask cannot be used with gather=True (pairs "
                         "across ranks are unknown to it); pass gather=False")
    exclude_mask = None if exclude is None else check_mask(exclude, "exclude", n, n, z.device)
    scale = _inverse_temperature(temperature, z)
    if gathering:
        everyone, all_labels = all_gather_rows(z), all_gather_rows_no_grad(labels)
        if local:
            offset = gathered_offset(n, True)
            return _contrast(_embed(z, "cosine"), _embed(everyone, "cosine"), scale,
                             labels=(labels, all_labels), exclude_self=True,
                             self_offset=offset, tile=tile, positives_name="labels").mean()
        z, labels = everyone, all_labels
    e = _embed(z, "cosine")
    return _contrast(e, e, scale, labels=(labels, labels), exclude_self=True,
                     exclude_mask=exclude_mask, tile=tile, positives_name="labels").mean()


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, *, temperature: float | Tensor = 0.2,
              similarity: str = "cosine", tile: int | None = None) -> Tensor:
    """The MoCo objective (He et al., 2020).

    Query i must pick out its key k_i against the K queued negatives (not against the other
    keys of the batch). Gradients reach only q (and a learnable temperature): k comes from
    the momentum encoder and the queue holds past keys, so both are detached here.

    Args:
        q, k: (N, D) queries and their keys.
        queue: (K, D) negative keys.
        temperature: > 0.
        similarity: "cosine" (default; normalising already normalised keys changes
            nothing) or "dot".
        tile: as in `info_nce`, over the N x K query-queue scores.

    Returns:
        Scalar loss, the mean over the N queries.
    """
    q, k = check_pair(q, k, "q", "k")
    queue = check_embeddings(queue, "queue")
    check_like(queue, q, "queue", "q", same_rows=False)
    check_choice(similarity, "similarity", SIMILARITIES)
    check_tile_size(tile)
    scale = _inverse_temperature(temperature, q)
    qe = _embed(q, similarity)
    ke = _embed(k.detach(), similarity)
    negatives = _embed(queue.detach(), similarity)
    positive = scale * (qe * ke).sum(1)
    negative_lse = _contrast(qe, negatives, scale, tile=tile)
    # -log( e^pos / (e^pos + sum_queue e^neg) )
    return (torch.logaddexp(positive, negative_lse) - positive).mean()


def cpc_loss(predictions: Tensor, targets: Tensor, *, temperature: float | Tensor = 1.0,
             similarity: str = "dot", tile: int | None = None) -> Tensor:
    """InfoNCE of Contrastive Predictive Coding (van den Oord et al., 2018).

    At each of the K future steps, prediction b must pick out target b among the B targets
    of that same step (the other items' targets are the negatives).

    Args:
        predictions: (B, K, D), e.g. W_k c_t per step (the bilinear map is the caller's).
        targets: (B, K, D) encodings z_{t+k}.
        temperature: > 0.
        similarity: "dot" (as in the paper) or "cosine".
        tile: as in `info_nce`, per step.

    Returns:
        Scalar loss, the mean over steps and items.
    """
    predictions = check_steps(predictions, "predictions", min_rows=2)
    targets = check_steps(targets, "targets", min_rows=2)
    if targets.shape != predictions.shape:
        raise ValueError(f"targets: expected shape {tuple(predictions.shape)} like predictions, "
                         f"got {tuple(targets.shape)}")
    check_like(targets, predictions, "targets", "predictions")
    check_choice(similarity, "similarity", SIMILARITIES)
    check_tile_size(tile)
    scale = _inverse_temperature(temperature, predictions)
    b, steps = predictions.shape[:2]
    index = torch.arange(b, device=predictions.device)
    per_step = [
        _contrast(_embed(predictions[:, s], similarity), _embed(targets[:, s], similarity),
                  scale, index=index, tile=tile)
        for s in range(steps)
    ]
    return torch.stack(per_step).mean()


# --------------------------------------------------------------------------- the numerics


def _contrast(a: Tensor, c: Tensor, scale: Tensor, *, index: Tensor | None = None,
              mask: Tensor | None = None, labels: tuple[Tensor, Tensor] | None = None,
              exclude_self: bool = False, exclude_mask: Tensor | None = None,
              tile: int | None = None, positives_name: str = "positives",
              self_offset: int = 0) -> Tensor:
    """Per-anchor loss (N,): log-sum-exp over the non-excluded scores minus the mean
    positive score. At most one of index / mask / labels; none gives the bare log-sum-exp.
    ``exclude_self`` leaves out candidate i + self_offset for anchor i (self_offset: where
    this rank's anchors sit among candidates gathered from every rank).
    Inputs are validated already; only the "every anchor has a positive" check is here."""
    n, m = a.shape[0], c.shape[0]
    if exclude_self and n + self_offset > m:
        raise ValueError(f"candidates: anchor rows {self_offset}..{self_offset + n} must be "
                         f"among the {m} candidates to exclude themselves")
    if index is not None:
        index = index.long()
        _check_index_not_excluded(index, exclude_self, exclude_mask, positives_name,
                                  self_offset)
    tile = _resolve_tile(tile, n, m, a.device)
    if tile == 0:
        return _contrast_full(a, c, scale, index, mask, labels, exclude_self, exclude_mask,
                              positives_name, self_offset)
    return _contrast_tiled(a, c, scale, index, mask, labels, exclude_self, exclude_mask,
                           tile, positives_name, self_offset)


def _contrast_both_ways(a: Tensor, c: Tensor, scale: Tensor, tile: int | None
                        ) -> tuple[Tensor, Tensor]:
    """Matched pairs (a_i, c_i) scored both ways over one score matrix: per row i,
    -log softmax_j(s_ij) at j = i, and per column j, -log softmax_i(s_ij) at i = j."""
    tile = _resolve_tile(tile, a.shape[0], c.shape[0], a.device)
    if tile == 0:
        scores = (a * scale) @ c.t()
        index = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(scores, index, reduction="none"),
                F.cross_entropy(scores.t(), index, reduction="none"))
    return tiled_logsumexp_both_ways(a, c, scale, tile, matched=True)


def _resolve_tile(tile: int | None, n: int, m: int, device: torch.device) -> int:
    if tile is None:
        return default_tile(device) if n * m > AUTO_TILE_ABOVE else 0
    return tile


def _contrast_full(a, c, scale, index, mask, labels, exclude_self, exclude_mask,
                   positives_name, self_offset=0) -> Tensor:
    positive = None
    if mask is not None or labels is not None:
        positive = mask.clone() if mask is not None else labels[0][:, None] == labels[1][None]
        if exclude_mask is not None:
            positive &= ~exclude_mask
        if exclude_self:
            positive.diagonal(self_offset).fill_(False)
        counts = positive.sum(1)
        _check_counts(counts, positives_name)
    scores = (a * scale) @ c.t()
    if exclude_self:
        scores.diagonal(self_offset).fill_(float("-inf"))
    if exclude_mask is not None:
        scores = scores.masked_fill(exclude_mask, float("-inf"))
    if index is not None:
        return F.cross_entropy(scores, index, reduction="none")
    lse = torch.logsumexp(scores, 1)
    if positive is None:
        return lse
    return lse - torch.where(positive, scores, 0.0).sum(1) / counts


def _contrast_tiled(a, c, scale, index, mask, labels, exclude_self, exclude_mask, tile,
                    positives_name, self_offset=0) -> Tensor:
    n, m = a.shape[0], c.shape[0]
    plan = dict(rows=tile, cols=tile, exclude_self=exclude_self, exclude_mask=exclude_mask,
                self_offset=self_offset if exclude_self else 0)
    outside = None      # label positives from class sums: plain autograd, O((N + M) D)
    if index is not None:
        plan["positive_index"] = index
    elif labels is not None and exclude_mask is None:
        dots, counts = _label_positive_dots(a, c, labels[0], labels[1], exclude_self,
                                            self_offset)
        _check_counts(counts, positives_name)
        outside = scale * dots / counts
    elif labels is not None or mask is not None:
        if mask is not None:
            plan["positive_mask"] = mask
        else:
            plan["anchor_labels"], plan["candidate_labels"] = labels
        counts = count_tile_positives(TilePlan(**plan), n, m, a.device)
        _check_counts(counts, positives_name)
        plan["positive_counts"] = counts
    terms = tiled_info_nce(a, c, scale, TilePlan(**plan))
    return terms if outside is None else terms - outside


def _label_positive_dots(a: Tensor, c: Tensor, anchor_labels: Tensor,
                         candidate_labels: Tensor, exclude_self: bool, self_offset: int = 0
                         ) -> tuple[Tensor, Tensor]:
    """Per anchor: the summed dot products with its same-label candidates, and their count,
    from per-class sums of the candidates (no N x M comparison at all). The anchors' own
    rows among the candidates start at self_offset."""
    n = a.shape[0]
    _, klass = torch.unique(torch.cat([anchor_labels, candidate_labels]), return_inverse=True)
    anchor_class, candidate_class = klass[:n], klass[n:]
    classes = int(klass.max()) + 1
    class_sums = a.new_zeros(classes, a.shape[1]).index_add(0, candidate_class, c)
    counts = torch.bincount(candidate_class, minlength=classes)[anchor_class]
    dots = (a * class_sums[anchor_class]).sum(1)
    if exclude_self:
        own = slice(self_offset, self_offset + n)
        same = anchor_class == candidate_class[own]
        dots = dots - same * (a * c[own]).sum(1)
        counts = counts - same.long()
    return dots, counts


# --------------------------------------------------------------------------- input checks


def _compute_dtype(x: Tensor) -> torch.dtype:
    # half precision: scores and log-sum-exp in float32 (exp overflows float16 at 11.1)
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _embed(x: Tensor, similarity: str) -> Tensor:
    x = x.to(_compute_dtype(x))
    return F.normalize(x, dim=1) if similarity == "cosine" else x


def _check_scalar_tensor(value: Tensor, name: str, ref: Tensor) -> None:
    if not value.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point scalar, got dtype {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} like the embeddings, got "
                         f"{value.device}")


def _inverse_temperature(temperature: float | Tensor, ref: Tensor) -> Tensor:
    """0-d tensor 1 / temperature in ref's compute dtype; differentiable if temperature is."""
    check_positive_scalar(temperature, "temperature")
    dtype = _compute_dtype(ref)
    if isinstance(temperature, Tensor):
        _check_scalar_tensor(temperature, "temperature", ref)
        return temperature.reshape(()).to(dtype).reciprocal()
    return torch.tensor(1.0 / float(temperature), dtype=dtype, device=ref.device)


def _clip_scale(logit_scale: Tensor | LogitScale | float, ref: Tensor) -> Tensor:
    dtype = _compute_dtype(ref)
    if isinstance(logit_scale, LogitScale):
        scale = logit_scale()
        if scale.device != ref.device:
            raise ValueError(f"logit_scale: expected device {ref.device} like image, got "
                             f"{scale.device}")
        return scale.to(dtype)
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale: expected a scalar, got a tensor of shape "
                             f"{tuple(logit_scale.shape)}")
        _check_scalar_tensor(logit_scale, "logit_scale", ref)
        check_finite(logit_scale, "logit_scale")
        return logit_scale.reshape(()).to(dtype).exp().clamp(max=CLIP_MAX_SCALE)
    value = check_number(logit_scale, "logit_scale")
    return torch.tensor(min(math.exp(min(value, 700.0)), CLIP_MAX_SCALE), dtype=dtype,
                        device=ref.device)


def _check_exclude(exclude: object, n: int, m: int, device: torch.device
                   ) -> tuple[bool, Tensor | None]:
    if exclude is None:
        return False, None
    if isinstance(exclude, str):
        check_choice(exclude, "exclude", (SELF,))
        if n > m:
            raise ValueError(
                f"exclude: 'self' pairs anchor i with candidate i, so expected at most as many "
                f"anchors as candidates, got {n} anchors and {m} candidates")
        return True, None
    if not isinstance(exclude, Tensor):
        raise ValueError(f"exclude: expected None, 'self' or a boolean ({n}, {m}) mask, got "
                         f"{type(exclude).__name__}")
    return False, check_mask(exclude, "exclude", n, m, device)


def _check_positives(positives: object, n: int, m: int, device: torch.device
                     ) -> tuple[Tensor | None, Tensor | None]:
    positives = check_tensor(positives, "positives")
    if positives.dtype == torch.bool:
        return None, check_mask(positives, "positives", n, m, device)
    if positives.ndim != 1:
        raise ValueError(
            f"positives: expected an integer index ({n},) or a boolean mask ({n}, {m}), got "
            f"dtype {positives.dtype} with shape {tuple(positives.shape)}")
    return check_index(positives, "positives", n, m, device), None


def _check_index_not_excluded(index: Tensor, exclude_self: bool, exclude_mask: Tensor | None,
                              name: str, self_offset: int = 0) -> None:
    if not exclude_self and exclude_mask is None:
        return
    rows = torch.arange(len(index), device=index.device)
    hit = torch.zeros(len(index), dtype=torch.bool, device=index.device)
    if exclude_self:
        hit |= index == rows + self_offset
    if exclude_mask is not None:
        hit |= exclude_mask[rows, index]
    if bool(hit.any()):
        bad = hit.nonzero()[:, 0]
        raise ValueError(
            f"{name}: expected every anchor's positive to be a scored (non-excluded) candidate, "
            f"got {len(bad)} anchors whose positive is excluded (rows {_first(bad)})")


def _check_counts(counts: Tensor, name: str) -> None:
    if bool((counts == 0).any()):
        bad = (counts == 0).nonzero()[:, 0]
        raise ValueError(
            f"{name}: expected at least one non-excluded positive for every anchor, got none "
            f"for {len(bad)} anchors (rows {_first(bad)})")


def _first(rows: Tensor, k: int = 8) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:k])
    return f"[{shown}{', ...' if len(rows) > k else ''}]"
