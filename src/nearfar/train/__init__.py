"""The method-agnostic Trainer, its settings, LARS, the schedule, checkpoints and guards."""

from nearfar.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    verify_checkpoint,
)
from nearfar.train.config import TrainConfig
from nearfar.train.guards import (
    CollapseGuard,
    EmbeddingCollapse,
    TrainingDiverged,
    embedding_spread,
)
from nearfar.train.lars import LARS, split_decay_groups
from nearfar.train.rng import seed_everything
from nearfar.train.schedule import WarmupCosine, warmup_cosine_factor
from nearfar.train.trainer import FitResult, Trainer

__all__ = [
    "LARS",
    "CheckpointError",
    "CollapseGuard",
    "EmbeddingCollapse",
    "FitResult",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "WarmupCosine",
    "embedding_spread",
    "load_checkpoint",
    "load_weights",
    "seed_everything",
    "split_decay_groups",
    "verify_checkpoint",
    "warmup_cosine_factor",
]
