"""Zero-shot classification with prompt templates (Radford et al., 2021).

Each class name is put into every template ("a {}" -> "a circle"); the text encoder
embeds each prompt, and a class is represented by the mean of its prompts' L2-normalised
embeddings, renormalised (the prompt ensemble of CLIP, section 3.1.4). An image takes the
class whose representation is most cosine-similar to its embedding. No training data is
used: the classifier is written in words.

The accuracy of every template on its own is kept in the protocol, so a card shows how
much a result depends on the wording.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nearfar.evaluate.inputs import as_embeddings, as_labels, check_int
from nearfar.evaluate.result import Result

EncodeText = Callable[[list[str]], Tensor]


def _check_templates(templates: object) -> list[str]:
    if isinstance(templates, str):
        templates = [templates]
    if not isinstance(templates, (list, tuple)) or not templates or any(
            not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise ValueError(f"templates: expected a non-empty list of strings with exactly one "
                         f"'{{}}' each, got {templates!r}")
    return list(templates)


def _check_classes(class_names: object) -> list[str]:
    if not isinstance(class_names, (list, tuple)) or len(class_names) < 2 or any(
            not isinstance(c, str) or not c for c in class_names):
        raise ValueError(f"class_names: expected a list of at least two non-empty strings, got "
                         f"{class_names!r}")
    return list(class_names)


def prompt_embeddings(encode_text: EncodeText, class_names: Sequence[str],
                      templates: Sequence[str]) -> Tensor:
    """L2-normalised embeddings of every (template, class) prompt: (T, C, D) float32.

    Args:
        encode_text: a callable mapping a list of strings to (len, D) embeddings (e.g.
            ``CLIP.encode_text``).
        class_names: C names, put in place of ``{}``.
        templates: T templates with one ``{}`` each.
    """
    if not callable(encode_text):
        raise ValueError(f"encode_text: expected a callable list[str] -> (N, D) tensor, got "
                         f"{type(encode_text).__name__}")
    class_names, templates = _check_classes(class_names), _check_templates(templates)
    prompts = [t.format(c) for t in templates for c in class_names]
    emb = encode_text(prompts)
    if not isinstance(emb, Tensor) or emb.ndim != 2 or emb.shape[0] != len(prompts):
        got = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(f"encode_text: expected a ({len(prompts)}, D) tensor for "
                         f"{len(prompts)} prompts, got {got}")
    emb = as_embeddings(emb.detach(), "encode_text(prompts)")
    return F.normalize(emb, dim=1).reshape(len(templates), len(class_names), -1)


def class_embeddings(prompt_emb: Tensor) -> Tensor:
    """The template ensemble: (T, C, D) normalised prompt embeddings -> (C, D), the mean
    over templates, renormalised."""
    if not isinstance(prompt_emb, Tensor) or prompt_emb.ndim != 3:
        raise ValueError("prompt_emb: expected a (T, C, D) tensor from prompt_embeddings")
    return F.normalize(prompt_emb.mean(0), dim=1)


def zero_shot_predict(image_emb, class_emb: Tensor, *, chunk_size: int = 4096) -> Tensor:
    """Index of the most cosine-similar class for each image: (N,) int64."""
    images = as_embeddings(image_emb, "image_emb")
    classes = as_embeddings(class_emb, "class_emb", dim=images.shape[1])
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    classes = F.normalize(classes, dim=1)
    out = [(F.normalize(images[a:a + chunk_size], dim=1) @ classes.T).argmax(1)
           for a in range(0, len(images), chunk_size)]
    return torch.cat(out)


def zero_shot_accuracy(image_emb, labels, class_names: Sequence[str],
                       templates: Sequence[str], encode_text: EncodeText, *,
                       name: str = "zero_shot_accuracy") -> Result:
    """Top-1 accuracy of the prompt-ensemble zero-shot classifier.

    Args:
        image_emb: (N, D) image embeddings (cosine similarity).
        labels: (N,) class indices into ``class_names``.
        class_names: the C class names as they are put into the prompts.
        templates: prompt templates, each with one ``{}``; more than one makes an ensemble.
        encode_text: list[str] -> (len, D) text embeddings.
        name: the metric's name in the Result.

    Returns:
        A :class:`Result`; its protocol lists the templates, the class names, the
        ensemble rule and ``per_template_accuracy`` (template -> accuracy with that
        template alone).
    """
    images = as_embeddings(image_emb, "image_emb")
    y = as_labels(labels, "labels", images.shape[0])
    class_names = _check_classes(class_names)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(class_names)):
        raise ValueError(f"labels: expected class indices in [0, {len(class_names)}) "
                         f"(one per class name), got values in [{int(y.min())}, {int(y.max())}]")
    prompts = prompt_embeddings(encode_text, class_names, templates)
    if prompts.shape[2] != images.shape[1]:
        raise ValueError(f"encode_text: expected {images.shape[1]}-d text embeddings like "
                         f"image_emb, got {prompts.shape[2]}-d")
    templates = _check_templates(templates)
    accuracy = float((zero_shot_predict(images, class_embeddings(prompts)) == y)
                     .double().mean())
    per_template = {t: round(float((zero_shot_predict(images, prompts[i]) == y)
                                   .double().mean()), 6) for i, t in enumerate(templates)}
    protocol = {
        "name": "zero-shot classification",
        "reference": "Radford et al., 2021",
        "templates": templates,
        "ensemble": "mean of the L2-normalised text embeddings of a class's prompts over the "
                    "templates, renormalised" if len(templates) > 1 else "single template",
        "classes": class_names,
        "similarity": "cosine",
        "n_images": int(images.shape[0]),
        "n_train": 0, "n_test": int(images.shape[0]),      # no training data is used
        "chance": round(1.0 / len(class_names), 6),
        "per_template_accuracy": per_template,
    }
    return Result(accuracy, name, protocol)


__all__ = ["class_embeddings", "prompt_embeddings", "zero_shot_accuracy", "zero_shot_predict"]
