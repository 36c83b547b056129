"""Captioned images for image-text methods: MNIST-5k with template captions, and the prompt
templates each captioned dataset suggests for zero-shot classification.

A captioned :class:`~nearfar.data.ImageDataset` keeps its captions twice: as strings in
``meta["caption"]`` (for people and evaluation) and as UTF-8 bytes in ``extras["text"]``
(a uint8 (N, W) tensor the trainer carries into every batch as ``batch["text"]``; the
method tokenizes it with its own tokenizer). ``meta["caption_group"]`` says which captions
describe the same thing (the same digit; the same shape, colour, size and place), the
positives of a retrieval evaluation.

    from nearfar.data import load_dataset
    ds = load_dataset("mnist5k_captions")
    ds.meta["caption"][0]          # 'a handwritten digit zero' (one of a few templates)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nearfar.data.bundled import load_mnist5k, register_dataset
from nearfar.data.dataset import ImageDataset
from nearfar.nn.text import texts_to_utf8

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: caption templates for MNIST-5k; ``{word}`` is the digit's name, ``{numeral}`` its numeral
MNIST_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}, written by hand",
    "a handwritten {numeral}",
    "a picture of the digit {word}",
)

#: zero-shot prompts for MNIST-5k; ``{}`` is the class name (the digit's word)
MNIST_PROMPTS = ("a handwritten digit {}", "a picture of the digit {}", "the number {}")

_PROMPTS: dict[str, tuple[str, ...]] = {"mnist5k_captions": MNIST_PROMPTS}


def register_prompts(dataset: str, templates: Sequence[str], *, overwrite: bool = False) -> None:
    """Record the zero-shot prompt templates (each with one ``{}``) of a captioned dataset."""
    templates = tuple(templates)
    if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise ValueError(f"templates: expected strings with exactly one '{{}}' each, got "
                         f"{templates!r}")
    if dataset in _PROMPTS and not overwrite and _PROMPTS[dataset] != templates:
        raise ValueError(f"prompts for {dataset!r} are already registered; pass overwrite=True")
    _PROMPTS[dataset] = templates


def prompt_templates(dataset: str, default: Sequence[str] | None = ("a {}",)
                     ) -> tuple[str, ...] | None:
    """The zero-shot prompt templates registered for a dataset name (else ``default``)."""
    found = _PROMPTS.get(dataset)
    return found if found is not None else (None if default is None else tuple(default))


def with_captions(ds: ImageDataset, captions: Sequence[str], *,
                  groups: Sequence[int] | None = None) -> ImageDataset:
    """``ds`` with ``meta["caption"]``, ``meta["caption_group"]`` (default: the label, else
    the item) and ``extras["text"]`` (the captions' UTF-8 bytes) set."""
    captions = list(captions)
    if len(captions) != len(ds) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions: expected {len(ds)} strings (one per image), got "
                         f"{len(captions)} items")
    if groups is None:
        groups = ds.labels.tolist() if ds.labels is not None else list(range(len(ds)))
    meta = {**ds.meta, "caption": captions, "caption_group": [int(g) for g in groups]}
    extras = {**ds.extras, "text": texts_to_utf8(captions)}
    return ImageDataset(images=ds.images, labels=ds.labels, meta=meta, name=ds.name,
                        version=ds.version, source=ds.source, label_names=ds.label_names,
                        split=ds.split, extras=extras)


def mnist_captions(labels: Sequence[int], *, seed: int = 0,
                   templates: Sequence[str] = MNIST_TEMPLATES) -> list[str]:
    """One caption per digit label, the template drawn at random (deterministic in seed)."""
    labels = [int(y) for y in labels]
    if any(not 0 <= y <= 9 for y in labels):
        raise ValueError("labels: expected digits 0..9")
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randint(len(templates), (len(labels),), generator=g).tolist()
    return [templates[t].format(word=DIGIT_WORDS[y], numeral=y) for y, t in zip(labels, pick)]


def load_mnist5k_captions(seed: int = 0) -> ImageDataset:
    """MNIST-5k (LeCun et al., 1998) with one template caption per image.

    Captions such as ``"a handwritten digit seven"`` or ``"a handwritten 7"`` (see
    :data:`MNIST_TEMPLATES`, drawn per image with ``seed``); class names are the digit
    words (``"seven"``), so zero-shot prompts read like the captions. The caption group of
    an image is its digit: every caption of a seven describes every seven.
    """
    base = load_mnist5k()
    ds = ImageDataset(images=base.images, labels=base.labels, meta=base.meta,
                      name="mnist5k_captions", version="1",
                      source=f"{base.source}; captions from {len(MNIST_TEMPLATES)} templates "
                             f"(nearfar.data.captions, seed={seed})",
                      label_names=list(DIGIT_WORDS))
    return with_captions(ds, mnist_captions(base.labels.tolist(), seed=seed))


register_dataset("mnist5k_captions", load_mnist5k_captions, overwrite=True)

__all__ = ["DIGIT_WORDS", "MNIST_PROMPTS", "MNIST_TEMPLATES", "load_mnist5k_captions",
           "mnist_captions", "prompt_templates", "register_prompts", "with_captions"]
