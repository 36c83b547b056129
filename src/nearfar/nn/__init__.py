"""Encoders and heads: ``SmallCNN``, ``ResNet18``, ``MLP``, ``ProjectionHead``."""

from nearfar.nn.encoders import MLP, BasicBlock, ResNet18, SmallCNN
from nearfar.nn.heads import ProjectionHead
from nearfar.nn.registry import (
    ENCODERS,
    build_encoder,
    parameter_count,
    register_encoder,
    resolve_encoder,
)

__all__ = [
    "ENCODERS",
    "MLP",
    "BasicBlock",
    "ProjectionHead",
    "ResNet18",
    "SmallCNN",
    "build_encoder",
    "parameter_count",
    "register_encoder",
    "resolve_encoder",
]

# sequence encoders for CPC and signals (issue 4); registers conv1d, conv1d_chunks, patch_chunks
from nearfar.nn.sequence import (  # noqa: E402
    ContextGRU,
    Conv1dChunks,
    Conv1dEncoder,
    PatchChunks,
    SequenceEncoder,
)

__all__ += ["ContextGRU", "Conv1dChunks", "Conv1dEncoder", "PatchChunks", "SequenceEncoder"]

# text for image-text methods (issue 4): tokenizers and a small text transformer
from nearfar.nn.text import (  # noqa: E402
    CharTokenizer,
    TextTransformer,
    WordTokenizer,
    build_tokenizer,
    tokenizer_from_state,
)

__all__ += ["CharTokenizer", "TextTransformer", "WordTokenizer", "build_tokenizer",
            "tokenizer_from_state"]

# shared parts of momentum, queue and self-distillation methods (issue 4)
from nearfar.nn.momentum import EMA, cosine_momentum  # noqa: E402
from nearfar.nn.predictor import PredictionHead  # noqa: E402
from nearfar.nn.prototypes import DinoHead  # noqa: E402
from nearfar.nn.queue import Queue  # noqa: E402

__all__ += ["EMA", "DinoHead", "PredictionHead", "Queue", "cosine_momentum"]
