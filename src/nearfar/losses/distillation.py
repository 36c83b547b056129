"""Self-distillation objectives: a student predicts a (stop-gradient) teacher.

``negative_cosine`` is the regression loss of BYOL (Grill et al., 2020) and SimSiam
(Chen & He, 2021); ``dino_loss`` with ``update_center`` is DINO's cross-entropy between
a centred, sharpened teacher and the student (Caron et al., 2021). No negatives: the
teacher's stop-gradient (and, for DINO, centring and sharpening) prevents collapse.

Many processes (``torch.distributed``): both losses are means of per-sample terms, so
each rank's mean over its own samples, averaged over ranks by DDP, is already the
global loss and gradient; nothing is gathered. DINO's center is a statistic of the
global batch: ``update_center(..., gather=True)`` all-reduces the teacher mean (no
gradient flows there) so that every rank keeps the same center, as DINO does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar import distributed

from .checks import (
    check_finite,
    check_fraction,
    check_like,
    check_pair,
    check_positive_scalar,
    check_tensor,
    check_view_logits,
)
from .collective import check_gather

__all__ = ["negative_cosine", "dino_loss", "update_center", "DinoCenter"]


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """Negative cosine similarity to a stop-gradient target (BYOL, Grill et al., 2020;
    SimSiam, Chen & He, 2021).

        loss = -mean_i cos(p_i, stopgrad(z_i))

    BYOL's ``2 - 2 cos`` differs by an affine map; SimSiam's symmetric loss is
    ``(negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2``.

    Args:
        p: (N, D) predictor outputs (online branch); receives the gradient.
        z: (N, D) targets (the other view's projection or the EMA teacher); detached here.

    Returns:
        Scalar in [-1, 1]; -1 when every p_i points along z_i.
    """
    p, z = check_pair(p, z, "p", "z")
    return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(1).mean()


def _check_center(center: object, teacher_logits: Tensor) -> Tensor:
    center = check_tensor(center, "center")
    k = teacher_logits.shape[2]
    if center.shape != (k,):
        raise ValueError(
            f"center: expected shape ({k},) like the last dimension of teacher_logits, "
            f"got {tuple(center.shape)}"
        )
    check_like(center, teacher_logits, "center", "teacher_logits", same_rows=False,
               same_cols=False)
    check_finite(center, "center")
    return center


def dino_loss(student_logits: Tensor, teacher_logits: Tensor, center: Tensor, *,
              student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> Tensor:
    """DINO's self-distillation cross-entropy (Caron et al., 2021).

    Teacher targets ``P_t = softmax((teacher - center) / teacher_temperature)`` (detached;
    centring and a low temperature prevent collapse); student predictions
    ``log P_s = log_softmax(student / student_temperature)``. The loss is
    ``-sum_k P_t[a] log P_s[b]`` averaged over the batch and over all pairs
    (teacher view a, student view b) with a != b.

    Args:
        student_logits: (V_s, N, K) prototype logits of the student for V_s views of N
            images; the first V_t views are the same crops the teacher saw (DINO: 2 global
            crops first, then the local crops). V_s >= 2 and V_s >= V_t.
        teacher_logits: (V_t, N, K) teacher logits on the global views; detached here.
        center: (K,) running center of the teacher logits (see ``update_center``).
        student_temperature: > 0 (DINO: 0.1).
        teacher_temperature: > 0 (DINO: 0.04, warmed up from 0.04 to 0.07 in long runs).

    Returns:
        Scalar loss, the mean over the V_t * V_s - V_t view pairs.
    """
    student_logits = check_view_logits(student_logits, "student_logits", min_views=2)
    teacher_logits = check_view_logits(teacher_logits, "teacher_logits")
    v_s, n, k = student_logits.shape
    v_t = teacher_logits.shape[0]
    if teacher_logits.shape[1:] != (n, k):
        raise ValueError(
            f"teacher_logits: expected shape (V_t, {n}, {k}) like student_logits "
            f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    if v_t > v_s:
        raise ValueError(
            f"teacher_logits: expected at most {v_s} views (the student's first views are "
            f"the teacher's), got {v_t}"
        )
    check_like(teacher_logits, student_logits, "teacher_logits", "student_logits",
               same_rows=False, same_cols=False)
    center = _check_center(center, teacher_logits)
    check_positive_scalar(student_temperature, "student_temperature")
    check_positive_scalar(teacher_temperature, "teacher_temperature")

    targets = torch.softmax((teacher_logits.detach() - center.detach()) / teacher_temperature,
                            dim=-1)                                          # (V_t, N, K)
    log_preds = torch.log_softmax(student_logits / student_temperature, dim=-1)  # (V_s, N, K)
    # cross[a, b] = mean_n -sum_k targets[a, n, k] log_preds[b, n, k]
    cross = -torch.einsum("ank,bnk->ab", targets, log_preds) / n            # (V_t, V_s)
    same_view = torch.eye(v_t, v_s, dtype=torch.bool, device=cross.device)
    return cross.masked_fill(same_view, 0.0).sum() / (v_t * v_s - v_t)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9, *,
                  gather: bool = False) -> Tensor:
    """DINO's center update (Caron et al., 2021): an EMA of the teacher's batch mean.

        new_center = momentum * center + (1 - momentum) * mean over views and rows

    Without gradient; returns a new tensor (``center`` is untouched). In data-parallel
    training the batch mean is averaged across processes first (``gather=True``), as
    DINO does, so every rank's center is the one-process center of the global batch.

    Args:
        center: (K,) current center.
        teacher_logits: (V_t, N, K) teacher logits of this batch.
        momentum: in [0, 1] (DINO: 0.9).
        gather: under ``torch.distributed``, the mean over every rank's batch (an
            all-reduce; every rank must pass the same N).

    Returns:
        (K,) new center.
    """
    teacher_logits = check_view_logits(teacher_logits, "teacher_logits")
    center = _check_center(center, teacher_logits)
    momentum = check_fraction(momentum, "momentum", include_one=True)
    gathering, _ = check_gather(gather, False)
    batch_center = teacher_logits.mean(dim=(0, 1))
    if gathering:
        batch_center = distributed.all_reduce_no_grad(batch_center, op="mean")
    return center * momentum + batch_center * (1.0 - momentum)


class DinoCenter(nn.Module):
    """DINO's loss with its running center as a buffer (Caron et al., 2021).

    Calling the module computes :func:`dino_loss` against the current center and then,
    in training mode, moves the center towards this batch's teacher mean, as DINO's
    reference loss does. ``update`` moves it explicitly.
    """

    center: Tensor

    def __init__(self, num_prototypes: int, *, momentum: float = 0.9,
                 student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> None:
        super().__init__()
        if not isinstance(num_prototypes, int) or isinstance(num_prototypes, bool) \
                or num_prototypes < 1:
            raise ValueError(
                f"num_prototypes: expected a positive integer, got {num_prototypes!r}"
            )
        self.momentum = check_fraction(momentum, "momentum", include_one=True)
        check_positive_scalar(student_temperature, "student_temperature")
        check_positive_scalar(teacher_temperature, "teacher_temperature")
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.register_buffer("center", torch.zeros(num_prototypes))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, *,
                gather: bool = False) -> Tensor:
        """(V_s, N, K) student and (V_t, N, K) teacher logits -> scalar loss; ``gather``:
        the center update averages the teacher mean over ranks (see ``update_center``)."""
        loss = dino_loss(student_logits, teacher_logits, self.center,
                         student_temperature=self.student_temperature,
                         teacher_temperature=self.teacher_temperature)
        if self.training:
            self.update(teacher_logits, gather=gather)
        return loss

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, *, gather: bool = False) -> None:
        """Move the center towards the mean of (V_t, N, K) teacher logits (of every
        rank's batch with ``gather``)."""
        self.center.copy_(update_center(self.center, teacher_logits, self.momentum,
                                        gather=gather))
