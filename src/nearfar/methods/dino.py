"""DINO, self-distillation with no labels (Caron et al., 2021).

A student (backbone + DINO head onto K prototypes) matches the output distribution of a
teacher, the student's momentum copy, across crops of one image: the teacher sees the two
global views, the student those and a few small local crops, and every student crop
predicts the teacher's distribution for every other crop. The teacher's logits are
centred (a running mean, :class:`~nearfar.losses.DinoCenter`) and sharpened (a low
temperature); the two together keep the output from collapsing, with no negatives.

Local crops are made by the views module's own ops: the global pipeline with its
``random_resized_crop`` swapped for a smaller-area one at a smaller output size (DINO:
96 px local crops for 224 px global ones), so each crop is one batched resampling.

Many processes (``gather``, see ``nearfar.methods.processes``): the loss is a mean of
per-image terms (DDP's averaging is exact without collectives); the teacher center
moves towards the mean over every rank's batch, so all ranks keep the same center.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nearfar.losses import DinoCenter
from nearfar.methods.base import StepOutput
from nearfar.methods.processes import check_gather_option, gathering, processes_card
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import TwoViewMethod, check_int, check_number
from nearfar.nn.momentum import EMA
from nearfar.nn.prototypes import DinoHead
from nearfar.views import Compose, RandomResizedCrop

#: DINO's local / global crop side (96 / 224), used when local_size is None
LOCAL_SIDE_RATIO = 96 / 224


def local_crop_pipeline(views: Callable, scale: tuple[float, float],
                        size: tuple[int, int]) -> tuple[Compose, bool]:
    """The pipeline making one local crop, and whether it reads the raw images.

    For a :class:`~nearfar.views.TwoViews` (or a :class:`~nearfar.views.Compose`) the first
    view's pipeline is reused with every ``random_resized_crop`` replaced by one of area
    ``scale`` and output ``size`` (one is put first when there is none): True. For any
    other pair maker, a crop of (area ``scale``, ``size``) is taken of one of its views:
    False.
    """
    pipeline = views if isinstance(views, Compose) else getattr(views, "view_1", None)
    if isinstance(pipeline, Compose):
        ops, replaced = [], False
        for op in pipeline:
            if isinstance(op, RandomResizedCrop):
                ops.append(RandomResizedCrop(scale=scale, ratio=op.params["ratio"], size=size))
                replaced = True
            else:
                ops.append(op)
        if not replaced:
            ops.insert(0, RandomResizedCrop(scale=scale, size=size))
        return Compose(ops), True
    return Compose([RandomResizedCrop(scale=scale, size=size)]), False


@register_method("dino")
class DINO(TwoViewMethod):
    """Student backbone + DINO head, EMA teacher, multi-crop, centring and sharpening.

    Args:
        encoder, views, encoder_kwargs, seed: as :class:`~nearfar.methods.SimCLR`;
            ``views`` makes the two global views.
        num_prototypes: K, the head's output size (DINO: 65536).
        hidden_dim, bottleneck_dim, head_layers, head_batch_norm: the DINO head.
        local_crops: number of small local crops per image (DINO: 6 to 10; 0 disables
            multi-crop).
        local_scale: [min, max] area fraction of a local crop (DINO: 0.05 to 0.4).
        local_size: side (or [h, w]) of the local crops; None: 3/7 of the input side
            (DINO's 96/224), or the input size when the encoder takes fixed-size
            vectors (an ``mlp`` with ``in_dim``).
        student_temperature, teacher_temperature: DINO 0.1 and 0.04.
        warmup_teacher_temperature, teacher_temperature_warmup: the teacher temperature
            starts at ``warmup_teacher_temperature`` and moves linearly to
            ``teacher_temperature`` over the first ``teacher_temperature_warmup`` fraction
            of training (DINO: 0.04 -> 0.07 over the first 30 epochs: a soft teacher
            early, while the prototypes are still random). None / 0 keeps it constant.
        center_momentum: of the teacher's running center (DINO: 0.9).
        base_momentum, momentum_schedule: the teacher's EMA (DINO: 0.996, cosine to 1).
        freeze_prototypes: fraction of training during which the prototypes (the head's
            last layer) get no gradient (DINO: the first epoch).
        embed_with: "teacher" (DINO evaluates the teacher's backbone: it is the better
            one, and its BatchNorm statistics come from global views only) or "student".
        gather: the center update averages the teacher mean over every process (None:
            when torch.distributed runs with world size > 1).
        grad_cache_chunk: run the student (backbone + head) this many crops at a time
            with cached gradients (GradCache, Gao et al., 2021): the same loss, student
            activation memory of one chunk. The 2B global views and the local crops
            (another size) are chunked separately, each group in one cached pass;
            BatchNorm statistics are per chunk. The teacher runs under no_grad on the
            global views at once. None (default) embeds each group at once.
    """

    name = "dino"

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, num_prototypes: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 64,
                 head_layers: int = 3, head_batch_norm: bool = False, local_crops: int = 6,
                 local_scale: Sequence[float] = (0.05, 0.4),
                 local_size: int | Sequence[int] | None = None,
                 student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                 warmup_teacher_temperature: float | None = None,
                 teacher_temperature_warmup: float = 0.0, center_momentum: float = 0.9,
                 base_momentum: float = 0.996,
                 momentum_schedule: str = "cosine", freeze_prototypes: float = 0.0,
                 embed_with: str = "teacher",
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 gather: bool | None = None, grad_cache_chunk: int | None = None) -> None:
        super().__init__(encoder, views, encoder_kwargs=encoder_kwargs, seed=seed,
                         grad_cache_chunk=grad_cache_chunk)
        self.gather = check_gather_option(gather)
        if embed_with not in ("teacher", "student"):
            raise ValueError(f"embed_with: expected 'teacher' or 'student', got {embed_with!r}")
        self.embed_with = embed_with
        self.freeze_prototypes = check_number(freeze_prototypes, "freeze_prototypes", low=0.0,
                                              high=1.0)
        # training progress seen by after_step, kept in the state so that a resumed run
        # freezes the prototypes exactly as an uninterrupted one
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        self.local_crops = check_int(local_crops, "local_crops", low=0)
        if (not isinstance(local_scale, (list, tuple)) or len(local_scale) != 2
                or not 0 < local_scale[0] <= local_scale[1] <= 1):
            raise ValueError(f"local_scale: expected [min, max] with 0 < min <= max <= 1, got "
                             f"{local_scale!r}")
        self.local_scale = (float(local_scale[0]), float(local_scale[1]))
        if local_size is not None:
            if isinstance(local_size, int) and not isinstance(local_size, bool):
                local_size = (local_size, local_size)
            if (not isinstance(local_size, (list, tuple)) or len(local_size) != 2
                    or not all(isinstance(v, int) and v >= 1 for v in local_size)):
                raise ValueError(f"local_size: expected an int >= 1, [height, width] or "
                                 f"None, got {local_size!r}")
            local_size = (int(local_size[0]), int(local_size[1]))
        self.local_size = local_size
        self.head = DinoHead(self.feature_dim, hidden_dim, bottleneck_dim, num_prototypes,
                             num_layers=head_layers, batch_norm=head_batch_norm)
        self.teacher = EMA(self._online(), base_momentum, schedule=momentum_schedule)
        self.dino = DinoCenter(num_prototypes, momentum=check_number(
            center_momentum, "center_momentum", low=0.0, high=1.0),
            student_temperature=student_temperature, teacher_temperature=teacher_temperature)
        self.views_per_item = 2 + self.local_crops
        self.final_teacher_temperature = float(teacher_temperature)
        self.teacher_temperature_warmup = check_number(
            teacher_temperature_warmup, "teacher_temperature_warmup", low=0.0, high=1.0)
        if warmup_teacher_temperature is None:
            self.warmup_teacher_temperature = self.final_teacher_temperature
        else:
            self.warmup_teacher_temperature = check_number(
                warmup_teacher_temperature, "warmup_teacher_temperature", low=0.0,
                low_open=True)
        self.dino.teacher_temperature = self.teacher_temperature_at(0.0)
        self._local: dict[tuple[int, int], tuple[Compose, bool]] = {}

    def _online(self) -> nn.Module:
        return nn.Sequential(self.encoder, self.head)

    def teacher_temperature_at(self, progress: float) -> float:
        """The teacher temperature at a point of training (0 = start, 1 = end)."""
        warm = self.teacher_temperature_warmup
        if warm <= 0 or progress >= warm:
            return self.final_teacher_temperature
        start, end = self.warmup_teacher_temperature, self.final_teacher_temperature
        return start + (end - start) * progress / warm

    def embed(self, x: Tensor) -> Tensor:
        encoder = self.teacher.module[0] if self.embed_with == "teacher" else self.encoder
        return encoder(x.contiguous(memory_format=self.memory_format))

    def _local_size_for(self, h: int, w: int) -> tuple[int, int]:
        if self.local_size is not None:
            return self.local_size
        if isinstance(getattr(self.encoder, "in_dim", None), int):
            return (h, w)  # a vector encoder takes one input size only
        return (max(1, round(h * LOCAL_SIDE_RATIO)), max(1, round(w * LOCAL_SIDE_RATIO)))

    def local_views(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """(local_crops * N, C, h, w): all local crops of the batch in one pass, stacked
        as [crop 1 of every image; crop 2 of every image; ...]."""
        h, w = x.shape[-2:]
        if (h, w) not in self._local:
            size = self._local_size_for(h, w)
            self._local[(h, w)] = local_crop_pipeline(self.views, self.local_scale, size)
        pipeline, from_raw = self._local[(h, w)]
        many = x.repeat(self.local_crops, 1, 1, 1)
        if not from_raw:
            out = self.views(many, generator)
            many = out[0] if isinstance(out, (tuple, list)) else out
        return pipeline(many, generator)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        x, g1, g2 = self.draw_views(batch, generator)
        g = generator if generator is not None else self._generator(x.device)
        n = x.shape[0]
        k = self.head.num_prototypes
        glob = torch.cat([g1, g2]).contiguous(memory_format=self.memory_format)
        frozen = self.freeze_prototypes > 0 and float(self.progress) < self.freeze_prototypes
        self.dino.teacher_temperature = self.teacher_temperature_at(float(self.progress))

        def student_fn(v: Tensor) -> Tensor:
            return self.head(self.encode(v), freeze_prototypes=frozen)

        # one (cached) pass per crop size: the global views, then the local crops
        student = [self.embed_views(student_fn, glob).float().view(2, n, k)]
        if self.local_crops:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                loc = self.local_views(x, g)
            loc = loc.contiguous(memory_format=self.memory_format)
            student.append(self.embed_views(student_fn, loc).float()
                           .view(self.local_crops, n, k))
        student_logits = torch.cat(student)                    # (2 + local_crops, N, K)
        with torch.no_grad():
            teacher_logits = self.teacher(glob).float().view(2, n, k)
            targets = torch.softmax((teacher_logits - self.dino.center)
                                    / self.dino.teacher_temperature, dim=-1)
            entropy = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()
        # cross-entropy over every (teacher view, other student view) pair; in training
        # mode the center then moves towards this batch's teacher mean
        loss = self.dino(student_logits, teacher_logits, gather=gathering(self.gather))
        metrics = {"momentum": self.teacher.last_momentum.clone(),
                   "teacher_entropy": entropy / math.log(k)}   # 1 = uniform, 0 = one-hot
        # the collapse guard watches the teacher's centred, sharpened distributions: they
        # become identical across images in both of DINO's collapses (one prototype for
        # every image, or the uniform distribution)
        return StepOutput(loss=loss, metrics=metrics, embeddings=targets[0])

    def after_step(self, progress: float) -> None:
        self.progress.fill_(float(progress))
        self.teacher.update(self._online(), progress)

    def _local_card(self) -> dict[str, Any]:
        if self._local:
            (h, w), (pipeline, from_raw) = next(iter(self._local.items()))
            ops: Any = pipeline.describe()
            size: Any = list(self._local_size_for(h, w))
        else:
            ops = "the global pipeline with a smaller random_resized_crop"
            size = list(self.local_size) if self.local_size else \
                "auto: 3/7 of the input side (DINO's 96/224)"
        return {"count": self.local_crops, "scale": list(self.local_scale), "size": size,
                "ops": ops}

    def describe(self) -> dict[str, Any]:
        return {
            "method": "dino",
            "reference": "Caron et al., 2021",
            "objective": {
                "loss": "dino_loss: cross-entropy between the centred, sharpened teacher "
                        "distribution of each global view and the student distribution of "
                        "every other crop",
                "temperature": {"student": self.dino.student_temperature,
                                "teacher": self.final_teacher_temperature,
                                **({"teacher_warmup": {
                                    "from": self.warmup_teacher_temperature,
                                    "over_fraction": self.teacher_temperature_warmup,
                                    "schedule": "linear"}}
                                   if self.teacher_temperature_warmup > 0 else {})},
                "center_momentum": self.dino.momentum,
                "center_statistics": processes_card(self.gather),
                "prototypes_frozen_for": self.freeze_prototypes,
                "head": {"in_dim": self.head.in_dim, "bottleneck_dim": self.head.bottleneck_dim,
                         "num_prototypes": self.head.num_prototypes},
                "teacher": {"kind": "momentum (EMA) copy of encoder + head, stop-gradient",
                            "momentum": {"base": self.teacher.base_momentum,
                                         "schedule": self.teacher.schedule}},
                "head_downstream": "dropped",
                "embedding_from": f"the {self.embed_with}'s backbone",
            },
            "positives": {
                "construction": f"multi-crop of the same image: 2 global views (seen by "
                                f"teacher and student) and {self.local_crops} local crops "
                                f"(student only)",
                "views": self.views_card(),
                "local_crops": self._local_card(),
            },
            "negatives": {
                "source": "none: non-contrastive (DINO self-distillation)",
                "construction": "none: collapse is prevented by centring and sharpening the "
                                "teacher's output, not by negatives",
                "batch_size": self.batch_size,
                "per_anchor": 0,
                "exclusions": [],
            },
            "modality": self.modality,
            "encoder": self.encoder_card(),
        }
