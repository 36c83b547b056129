"""The text-pair path of :mod:`nearfar.api`: train a dual encoder on (query, document) pairs,
evaluate query -> document retrieval on held-out groups, load it back.

``nearfar.api.train`` comes here when a recipe's data are text pairs (``data.source =
"stdlib_code"``, or ``"text_pairs"`` with a JSONL/CSV ``data.path``)::

    nearfar train text_pairs                  # docstring -> code search on the stdlib
    enc = nearfar.load("runs/text-pairs-...")
    enc.embed_queries(["Return the sum of a and b."]) @ enc.embed_documents(codes).T

The split holds whole groups out (``group_split``: for the stdlib corpus, whole
top-level modules), so retrieval is scored on code the encoder never saw. A query's
relevant documents are those whose own query has the same text (identical docstrings
cannot be told apart), so a query may have several positives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nearfar.data.text_pairs import TextPairDataset, group_split, load_text_pairs
from nearfar.durable import atomic_write_json
from nearfar.evaluate import retrieval_metrics
from nearfar.methods import build_method
from nearfar.nn.text import CodeTokenizer, WordTokenizer
from nearfar.recipe import RecipeError
from nearfar.rundir import (
    EVAL_FILE,
    RECIPE_FILE,
    RunResult,
    load_weights_into,
    make_card,
    on_lead,
    train_config,
)
from nearfar.train import Trainer

#: recipe [method] keys read here (vocabulary building), not passed to the method
VOCABULARY_KEYS = ("vocab_min_count", "vocab_max_size")


def load_text_source(data: dict[str, Any]) -> TextPairDataset:
    """A ``text_pairs`` [data] section: a JSONL or CSV file of (query, document) pairs."""
    if not data["path"]:
        raise RecipeError("recipe.data.path: expected a .jsonl or .csv file of pairs (columns "
                          "query, document and optionally group) for source = "
                          "\"text_pairs\", got nothing")
    return load_text_pairs(data["path"])


def split_text_pairs(ds: TextPairDataset, data: dict[str, Any], seed: int
                     ) -> tuple[TextPairDataset, TextPairDataset]:
    test_size = data["test_size"]
    test_size = int(test_size) if test_size >= 1 else float(test_size)
    try:
        return group_split(ds, test_size, seed=seed)
    except ValueError as exc:
        raise RecipeError(f"recipe.data.test_size: {exc}") from None


def build_dual_encoder(values: dict[str, Any], train_ds: TextPairDataset | None = None,
                       tokenizer_state: dict[str, Any] | None = None):
    """The recipe's dual encoder; its word/code vocabulary comes from the training texts
    (``vocab_min_count``, ``vocab_max_size``) unless the recipe lists one."""
    meth = dict(values["method"])
    name = meth.pop("name")
    min_count = meth.pop("vocab_min_count", 2)
    max_size = meth.pop("vocab_max_size", 20000)
    kind = meth.get("tokenizer", "code")
    if tokenizer_state is not None and tokenizer_state.get("kind") == "minilm":
        meth.pop("tokenizer", None)
    elif tokenizer_state is not None:
        meth["tokenizer"] = tokenizer_state
        meth.pop("vocabulary", None)
    elif meth.get("backbone") == "minilm":
        meth.pop("tokenizer", None)          # the pretrained model's own WordPiece
    elif kind in ("code", "word") and not meth.get("vocabulary"):
        if train_ds is None:
            raise RecipeError("recipe.method.vocabulary: needed to rebuild this encoder")
        cls = CodeTokenizer if kind == "code" else WordTokenizer
        try:
            meth["tokenizer"] = cls.from_texts(train_ds.queries + train_ds.documents,
                                               min_count=min_count, max_size=max_size)
        except ValueError as exc:
            raise RecipeError(f"recipe.method.vocab_min_count: {exc}") from None
    enc_name = values["encoder"].get("name")
    try:
        return build_method(name, encoder=None if enc_name in (None, "small_cnn") else enc_name,
                            seed=values["seed"], **meth)
    except TypeError as exc:
        raise RecipeError(f"recipe.method: {exc}") from None
    except ValueError as exc:
        raise RecipeError(f"recipe.method: {exc}") from None


def _query_groups(ds: TextPairDataset) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(q, len(ids)) for q in ds.queries]


def evaluate_text_pairs(method, test_ds: TextPairDataset, *, ks: Sequence[int] = (1, 5, 10)
                        ) -> list[dict[str, Any]]:
    """Query -> document and document -> query recall@k and MRR on the held-out pairs:
    every held-out document is a candidate; a query's relevant documents are those paired
    with a query of the same text."""
    q = method.embed_queries(test_ds.queries)
    d = method.embed_documents(test_ds.documents)
    groups = _query_groups(test_ds)
    held = (test_ds.split or {}).get("test_groups")
    results = []
    for direction, a, b in (("query_to_document", q, d), ("document_to_query", d, q)):
        found = retrieval_metrics(a, b, query_groups=groups, item_groups=groups, ks=ks,
                                  direction=direction)
        for r in found.values():
            r.protocol["held_out"] = (f"{len(held)} groups never seen in training: "
                                      f"{', '.join(held[:12])}{' ...' if len(held) > 12 else ''}"
                                      if held else "the test split")
            r.protocol["relevance"] = "documents paired with a query of identical text"
        results += [r.to_dict() for r in found.values()]
    return results


def train_text_pairs(rec, values: dict[str, Any], dataset: TextPairDataset, run_dir: Path,
                     resume: bool, progress: bool | None, many: bool, lead: bool):
    """:func:`nearfar.api.train` for text pairs (see the module docstring)."""
    train_ds, test_ds = split_text_pairs(dataset, values["data"], values["seed"])
    saved_tokenizer = None
    if resume and (run_dir / RECIPE_FILE).exists():
        import json
        saved_tokenizer = json.loads((run_dir / RECIPE_FILE).read_text("utf-8")).get("tokenizer")
    method = build_dual_encoder(values, train_ds, saved_tokenizer)
    config = train_config(values, progress=progress)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / RECIPE_FILE,
                          {"recipe": values, "input_shape": [], "modality": "text-text",
                           "tokenizer": method.tokenizer.state_dict()})
    # tokenize once: the training loop then only indexes token ids
    tokens = method.tokenize_dataset(train_ds)
    if not resume:
        method.init_from_corpus(tokens)   # e.g. IDF token weights (a resume loads its own)
    trainable = train_ds.subset(range(len(train_ds)))
    trainable.extras = tokens
    fit = Trainer(method, trainable, config, run_dir=run_dir).fit(resume=resume)
    if not lead:
        results, card = on_lead(None, many)
        return RunResult(run_dir=run_dir, fit=fit.to_dict(), results=results, card=card)
    results = evaluate_text_pairs(method, test_ds)
    atomic_write_json(run_dir / EVAL_FILE, {"fit": fit.to_dict(), "results": results})
    card = make_card(run_dir, method, values, dataset, train_ds, test_ds, results, rec.source,
                     protocol="query and document embeddings of the trained towers (cosine); "
                              "retrieval among all held-out documents, on groups held out "
                              "of training")
    on_lead((results, card), many)
    return RunResult(run_dir=run_dir, fit=fit.to_dict(), results=results, card=card)


class TextEncoder:
    """A trained dual encoder: ``embed_queries`` / ``embed_documents`` map texts to
    L2-normalised (N, D) embeddings in one space (``embed`` is ``embed_queries``)."""

    def __init__(self, method, run_dir: Path, card: dict[str, Any] | None,
                 device: torch.device) -> None:
        self.method = method.eval()
        self.run_dir, self.card, self.device = run_dir, card, device
        self.embedding_dim = int(method.embed_dim)

    def embed_queries(self, texts: Sequence[str] | str, *, batch_size: int = 256) -> Tensor:
        return self.method.embed_queries(texts, batch_size=batch_size).cpu()

    def embed_documents(self, texts: Sequence[str] | str, *, batch_size: int = 256) -> Tensor:
        return self.method.embed_documents(texts, batch_size=batch_size).cpu()

    embed = embed_queries
    __call__ = embed_queries


def load_text_encoder(run_dir: str | os.PathLike, values: dict[str, Any],
                      device: str = "auto") -> TextEncoder:
    import json

    from nearfar.card import read_card
    from nearfar.train.trainer import resolve_device

    run_dir = Path(run_dir)
    saved = json.loads((run_dir / RECIPE_FILE).read_text("utf-8"))
    if "tokenizer" not in saved:
        raise RecipeError(f"{run_dir}/recipe.json: has no tokenizer; was it written by an "
                          f"older nearfar?")
    method = build_dual_encoder(values, None, saved["tokenizer"])
    load_weights_into(method, run_dir)
    dev = resolve_device(device)
    method.to(dev)
    try:
        card = read_card(run_dir)
    except Exception:  # a run without a card still loads; `nearfar card check` reports it
        card = None
    return TextEncoder(method, run_dir, card, dev)


__all__ = ["TextEncoder", "build_dual_encoder", "evaluate_text_pairs", "load_text_encoder",
           "load_text_source", "split_text_pairs", "train_text_pairs"]
