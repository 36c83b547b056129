"""Trainer settings, checked on construction with messages that name the field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

OPTIMIZERS = ("adamw", "lars")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything the :class:`~nearfar.train.Trainer` needs besides the method and data.

    Run length:
        steps: optimizer steps (used unless ``epochs`` is set).
        epochs: run length in passes over the data (overrides ``steps``); the
            step count is ``max(1, round(epochs * steps_per_epoch))``.
        time_budget_s: stop (with a checkpoint) once training has run this long,
            counted across resumes; 0 disables. The schedule still spans ``steps``.

    Batches and optimisation:
        batch_size: items per micro-batch and per process; each micro-batch is its
            own set of in-batch negatives (unless the method gathers them across
            processes). Under ``torchrun`` with N processes the global batch is
            ``batch_size * N``. An epoch drops the last partial step.
        accumulate: micro-batches per optimizer step (gradient accumulation); the
            optimizer sees ``batch_size * accumulate`` items per step.
        optimizer: "adamw" or "lars" (You et al., 2017). Biases and norm
            parameters (every parameter with ndim <= 1) get no weight decay and,
            for LARS, no trust-ratio adaptation.
        lr, weight_decay, momentum (LARS), betas (AdamW), lars_trust_coefficient.
        warmup_steps: linear warmup from lr / warmup_steps to lr.
        min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio.
        grad_clip: clip the global gradient norm to this; 0 disables.

    Numerics and device:
        precision: "fp32" or "bf16" (autocast; weights and optimizer stay fp32).
        channels_last: run the encoder on channels-last tensors (fast with bf16
            convolutions on CPUs with AMX/AVX512-BF16 and on GPUs).
        fused_optimizer: AdamW as one fused kernel over all parameters (CPU and CUDA)
            instead of a Python loop over tensors; LARS ignores it. The update is the
            same to float rounding (~1e-7).
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
        data_on_device: copy the whole uint8 image tensor to the device once.
        threads: CPU threads for torch during fit() (restored afterwards); 0 keeps
            the current setting. On a CPU shared with other busy processes, 1 thread
            can be several times faster than oversubscribed OpenMP threads.
        seed: seeds the data order, the views, and torch/python/numpy globals.

    Many processes (``torchrun``):
        sync_batchnorm: turn every BatchNorm into ``torch.nn.SyncBatchNorm``, so that
            the batch statistics span all processes' items (CUDA only); without it
            each process normalises over its own ``batch_size`` items.
        allow_world_size_change: let a resume continue a checkpoint written by a
            different number of processes (the global batch changes, and the run is
            no longer the same as an uninterrupted one); refused otherwise.

    Records:
        checkpoint_every: write a checkpoint every K steps (0: only at the end).
        keep_checkpoints: how many step checkpoints to keep (>= 1).
        log_every: one metrics.jsonl line (and progress-bar update) every K steps.
        progress: show a tqdm progress bar.
        tensorboard: also write TensorBoard events when tensorboard is installed.

    Guards:
        collapse_std: stop with EmbeddingCollapse when the spread of the normalised
            embeddings (mean per-dimension std x sqrt(D): 1 for points uniform on the
            sphere, 0 when all are identical) stays below this; 0 disables.
        collapse_patience: consecutive steps below ``collapse_std`` before stopping.
    """

    steps: int = 1000
    epochs: float | None = None
    time_budget_s: float = 0.0
    batch_size: int = 256
    accumulate: int = 1
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    lars_trust_coefficient: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 0.0
    precision: str = "fp32"
    channels_last: bool = False
    fused_optimizer: bool = False
    device: str = "auto"
    data_on_device: bool = True
    threads: int = 0
    seed: int = 0
    sync_batchnorm: bool = False
    allow_world_size_change: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    collapse_std: float = 0.05
    collapse_patience: int = 20

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= {low}, got {v!r}")

        def number(name: str, low: float, *, strict: bool = False, high: float | None = None
                   ) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and (v > low if strict else v >= low) and (high is None or v <= high)
            if not ok:
                rel = ">" if strict else ">="
                rng = f"{rel} {low}" + ("" if high is None else f" and <= {high}")
                raise ValueError(f"TrainConfig.{name}: expected a number {rng}, got {v!r}")
            setattr(self, name, float(v))

        integer("steps", 1)
        if self.epochs is not None:
            number("epochs", 0.0, strict=True)
        number("time_budget_s", 0.0)
        integer("batch_size", 2)
        integer("accumulate", 1)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer: expected one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        number("lr", 0.0, strict=True)
        number("weight_decay", 0.0)
        number("momentum", 0.0, high=1.0)
        if len(tuple(self.betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas: expected two numbers in [0, 1), got "
                             f"{self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        number("lars_trust_coefficient", 0.0, strict=True)
        integer("warmup_steps", 0)
        number("min_lr_ratio", 0.0, high=1.0)
        number("grad_clip", 0.0)
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision: expected one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if not isinstance(self.fused_optimizer, bool):
            raise ValueError(f"TrainConfig.fused_optimizer: expected true or false, got "
                             f"{self.fused_optimizer!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"TrainConfig.device: expected 'auto', 'cpu', 'cuda' or "
                             f"'cuda:N', got {self.device!r}")
        integer("threads", 0)
        integer("seed", 0)
        for name in ("sync_batchnorm", "allow_world_size_change"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}: expected true or false, got "
                                 f"{getattr(self, name)!r}")
        integer("checkpoint_every", 0)
        integer("keep_checkpoints", 1)
        integer("log_every", 1)
        number("collapse_std", 0.0)
        integer("collapse_patience", 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from plain data, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)
