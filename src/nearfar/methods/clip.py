"""CLIP (Radford et al., 2021): an image tower and a text tower trained so that each image
picks out its own caption among the batch's captions and each caption its own image.

``loss = "siglip"`` swaps the softmax objective for SigLIP's pairwise sigmoid loss (Zhai
et al., 2023), with its learnable scale and bias.

A batch carries the captions as ``batch["tokens"]`` (token ids made with this method's
tokenizer) or as ``batch["text"]`` (UTF-8 bytes, the form captioned datasets keep in
``extras["text"]``), which the method tokenizes itself: the tokenizer belongs to the
method, and its state is part of :meth:`CLIP.describe`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar.losses import LogitScale, SigLipParams, clip_loss
from nearfar.methods.base import Method, StepOutput, check_batch
from nearfar.methods.processes import (
    check_gather_option,
    check_local_loss,
    gathering,
    processes_card,
)
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import check_int
from nearfar.nn import parameter_count, resolve_encoder
from nearfar.nn.text import TextTransformer, build_tokenizer, texts_to_utf8, trim_padding

LOSSES = ("clip", "siglip")


class Tower(nn.Module):
    """An encoder followed by a linear projection into the joint space; ``out_dim`` is the
    joint dimension, ``backbone.out_dim`` the encoder's own feature size."""

    def __init__(self, backbone: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(int(backbone.out_dim), int(out_dim), bias=False)
        self.out_dim = int(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.backbone(x))


@register_method("clip")
class CLIP(Method):
    """Image encoder -> projection and text transformer -> projection, contrasted in-batch.

    Args:
        encoder: the image encoder, an ``nn.Module`` with ``out_dim`` or a registered name
            (built with ``encoder_kwargs``; use ``in_channels=3`` for RGB).
        views: optional image views ``views(x, generator) -> x`` (or a pair maker, whose
            first view is used), applied only when ``augment`` is True. Captions that
            name places or colours are easily contradicted by crops, flips or colour
            jitter, so the default is no views.
        augment: apply ``views`` to the training images.
        tokenizer: ``"char"`` (a fixed alphabet, or ``vocabulary`` as the alphabet),
            ``"word"`` (``vocabulary``: the list of words), a tokenizer object, or its
            ``state_dict()``.
        vocabulary: see ``tokenizer``.
        context_length: longest token row (<bos> and <eos> included); longer captions are
            cut.
        text_width, text_layers, text_heads, text_pooling: the text transformer.
        embed_dim: dimension of the joint space.
        loss: ``"clip"`` (symmetric InfoNCE, learnable inverse temperature clamped at
            ``max_scale``) or ``"siglip"`` (sigmoid loss, learnable scale and bias).
        temperature: initial temperature of the CLIP loss (0.07 in the paper).
        max_scale: cap on the CLIP inverse temperature (100 in the paper).
        siglip_scale, siglip_bias: SigLIP's initial scale and bias (10 and -10).
        encoder_kwargs: constructor keywords when ``encoder`` is a name.
        seed: seeds the views when no generator is passed to :meth:`loss`.
        tile: rows per tile of the exact memory-linear loss (None: automatic).
        gather: contrast with the pairs of every process (None: when torch.distributed
            runs with world size > 1): the loss of one process on the global batch.
        local_loss: with gather, each rank scores only its own images and captions
            against every rank's (less work per rank, the same gradient); see
            ``nearfar.losses.clip_loss`` / ``siglip_loss``.
    """

    name = "clip"
    modality = "image-text"
    views_per_item = 1

    def __init__(self, encoder: nn.Module | str = "small_cnn", views: Callable | None = None,
                 *, augment: bool = False, tokenizer: Any = "char",
                 vocabulary: Sequence[str] | str | None = None, context_length: int = 64,
                 text_width: int = 128, text_layers: int = 2, text_heads: int = 4,
                 text_pooling: str = "eos", embed_dim: int = 128, loss: str = "clip",
                 temperature: float = 0.07, max_scale: float = 100.0,
                 siglip_scale: float = 10.0, siglip_bias: float = -10.0,
                 encoder_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 tile: int | None = None, gather: bool | None = None,
                 local_loss: bool = False) -> None:
        super().__init__()
        self.gather = check_gather_option(gather)
        self.local_loss = check_local_loss(local_loss)
        encoder = resolve_encoder(encoder, encoder_kwargs)
        if not isinstance(encoder, nn.Module) or not isinstance(getattr(encoder, "out_dim",
                                                                        None), int):
            raise ValueError(f"encoder: expected an nn.Module with an `out_dim` int attribute "
                             f"or a registered name, got {type(encoder).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"loss: expected 'clip' or 'siglip', got {loss!r}")
        if augment and not callable(views):
            raise ValueError("views: augment=True needs views, a callable (images, generator)")
        embed_dim = check_int(embed_dim, "embed_dim")
        self.context_length = check_int(context_length, "context_length", low=2)
        self.tokenizer = build_tokenizer(tokenizer, vocabulary=vocabulary)
        self.encoder = Tower(encoder, embed_dim)
        text = TextTransformer(self.tokenizer.vocab_size, context_length=self.context_length,
                               width=check_int(text_width, "text_width"),
                               layers=check_int(text_layers, "text_layers"),
                               heads=check_int(text_heads, "text_heads"),
                               pooling=text_pooling)
        self.text_encoder = Tower(text, embed_dim)
        self.loss_name = loss
        if loss == "clip":
            self.logit_scale = LogitScale(temperature, max_scale=max_scale)
        else:
            self.siglip = SigLipParams(init_scale=siglip_scale, init_bias=siglip_bias)
        self.temperature, self.max_scale = float(temperature), float(max_scale)
        self.siglip_init = (float(siglip_scale), float(siglip_bias))
        self.views = views
        self.augment = bool(augment)
        self.seed = int(seed)
        self.tile = tile
        self._own_generator: torch.Generator | None = None

    # ---------------------------------------------------------------- embeddings
    def embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, embed_dim) image embeddings in the joint space."""
        return self.encoder(x.contiguous(memory_format=self.memory_format))

    def tokenize(self, texts: Sequence[str] | str) -> Tensor:
        """Texts -> (B, L) token ids, cut at context_length and padded to the longest."""
        return trim_padding(self.tokenizer.encode(texts, self.context_length))

    def embed_text(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids (from :meth:`tokenize`) -> (B, embed_dim) text embeddings."""
        return self.text_encoder(tokens)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | str, *, batch_size: int = 512) -> Tensor:
        """Texts -> (B, embed_dim) float32 text embeddings on the CPU (eval mode, batched)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            out = [self.embed_text(self.tokenize(texts[i:i + batch_size]).to(device)).float()
                   .cpu() for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.encoder.out_dim)

    def batch_tokens(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's captions as token ids: ``batch["tokens"]``, else ``batch["text"]``
        (UTF-8 bytes) tokenized."""
        tokens = batch.get("tokens")
        if tokens is None:
            text = batch.get("text")
            if text is None:
                raise ValueError(f"batch: expected captions as 'tokens' (token ids) or 'text' "
                                 f"(UTF-8 bytes, e.g. a captioned dataset's extras), got keys "
                                 f"{sorted(batch)}")
            if isinstance(text, (list, tuple)):
                text = texts_to_utf8(text)
            tokens = trim_padding(self.tokenizer.encode_utf8(text, self.context_length))
        return tokens

    # ---------------------------------------------------------------- objective
    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._own_generator
        if g is None or g.device != device:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._own_generator = g
        return g

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        x = check_batch(batch)
        tokens = self.batch_tokens(batch).to(x.device)
        if tokens.shape[0] != x.shape[0]:
            raise ValueError(f"batch: expected one caption per image ({x.shape[0]}), got "
                             f"{tokens.shape[0]} token rows")
        if self.augment:
            g = generator if generator is not None else self._generator(x.device)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                out = self.views(x, g)
                x = out[0] if isinstance(out, (tuple, list)) else out
        image = self.embed(x).float()
        text = self.embed_text(tokens).float()
        metrics: dict[str, float | Tensor] = {}
        gather = gathering(self.gather)
        if self.loss_name == "clip":
            loss = clip_loss(image, text, self.logit_scale, tile=self.tile, gather=gather,
                             local_loss=self.local_loss)
            metrics["logit_scale"] = self.logit_scale().detach()
        else:
            loss = self.siglip(image, text, tile=self.tile, gather=gather,
                               local_loss=self.local_loss)
            metrics["logit_scale"] = self.siglip.logit_scale.detach().exp()
            metrics["logit_bias"] = self.siglip.logit_bias.detach()
        with torch.no_grad():
            i, t = F.normalize(image, dim=1), F.normalize(text, dim=1)
            sim = i @ t.T
            metrics["positive_cosine"] = sim.diagonal().mean()
            metrics["image_to_text_accuracy"] = (sim.argmax(1) == torch.arange(
                len(sim), device=sim.device)).float().mean()
        return StepOutput(loss=loss, metrics=metrics, embeddings=image.detach())

    # ---------------------------------------------------------------- card
    def describe(self) -> dict[str, Any]:
        n = self.batch_size
        if self.loss_name == "clip":
            objective: dict[str, Any] = {
                "loss": "clip_loss",
                "form": "symmetric InfoNCE over the batch's image-caption scores (image -> "
                        "text and text -> image cross-entropies, averaged); cosine similarity",
                "reference": "Radford et al., 2021",
                "logit_scale": {"learnable": True, "initial_temperature": self.temperature,
                                "max_scale": self.max_scale,
                                "current_scale": float(self.logit_scale().detach())},
            }
        else:
            objective = {
                "loss": "siglip_loss",
                "form": "pairwise sigmoid loss: each of the N x N image-caption pairs is a "
                        "binary problem (diagonal +1, others -1); cosine similarity",
                "reference": "Zhai et al., 2023",
                "logit_scale": {"learnable": True, "initial_scale": self.siglip_init[0],
                                "current_scale": float(self.siglip.logit_scale.detach().exp())},
                "logit_bias": {"learnable": True, "initial": self.siglip_init[1],
                               "current": float(self.siglip.logit_bias.detach())},
            }
        scale = float(self.logit_scale().detach()) if self.loss_name == "clip" else \
            float(self.siglip.logit_scale.detach().exp())
        objective["temperature"] = {"learned": True, "current": 1.0 / scale}
        objective["embed_dim"] = self.encoder.out_dim
        objective["head_downstream"] = "kept (embeddings are the joint image-text space)"
        text = self.text_encoder.backbone
        views: Any = ["none (the image as given)"]
        if self.augment:
            describe = getattr(self.views, "describe", None)
            views = describe() if callable(describe) else [type(self.views).__name__]
        return {
            "method": "clip" if self.loss_name == "clip" else "clip (siglip loss)",
            "reference": "Radford et al., 2021" + ("" if self.loss_name == "clip"
                                                    else "; Zhai et al., 2023"),
            "objective": objective,
            "positives": {
                "construction": "an image and its caption",
                "views": views,
            },
            "negatives": {
                "source": "in-batch",
                "description": "the other captions / images of the batch",
                "batch_size": n,
                "per_anchor": None if n is None else n - 1,
                "exclusions": ["none: a duplicate caption of another image in the batch "
                               "counts as a negative"],
                "processes": processes_card(self.gather, self.local_loss),
            },
            "modality": self.modality,
            "encoder": {
                "class": type(self.encoder.backbone).__name__,
                "out_dim": self.encoder.out_dim,
                "backbone_out_dim": int(self.encoder.backbone.out_dim),
                "projection": f"linear {self.encoder.backbone.out_dim} -> "
                              f"{self.encoder.out_dim}",
                "parameters": parameter_count(self.encoder),
            },
            "text_encoder": {
                "class": type(text).__name__,
                "width": text.width,
                "layers": len(text.layers),
                "context_length": text.context_length,
                "pooling": text.pooling,
                "projection": f"linear {text.out_dim} -> {self.text_encoder.out_dim}",
                "parameters": parameter_count(self.text_encoder),
                "tokenizer": self.tokenizer.describe(),
            },
        }
