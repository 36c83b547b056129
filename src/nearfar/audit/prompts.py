"""Prompt sensitivity of zero-shot classification: how much the answer depends on wording.

Each template alone ("a handwritten digit {}", "the number {}", ...) makes its own
zero-shot classifier (Radford et al., 2021); its accuracy, overall and per group, is
read on the same images. The spread over templates (mean, standard deviation, range)
says how far a reported zero-shot number rests on one phrasing, and the worst group per
template whether a wording fails some group more than others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nearfar.audit.groups import AuditError, encode
from nearfar.evaluate.inputs import as_embeddings, as_labels
from nearfar.evaluate.zero_shot import class_embeddings, prompt_embeddings, zero_shot_predict


def prompt_sensitivity(image_emb, labels, class_names: Sequence[str],
                       templates: Sequence[str], encode_text: Callable[[list[str]], torch.Tensor],
                       *, groups=None) -> dict[str, Any]:
    """Zero-shot accuracy per template, its spread, and the worst group per template.

    Args:
        image_emb: (N, D) image embeddings.
        labels: (N,) class indices into ``class_names``.
        class_names: C names put into the templates.
        templates: T >= 1 templates, each with one ``{}``.
        encode_text: list[str] -> (len, D) text embeddings (e.g. ``CLIP.encode_text``).
        groups: optional (N,) groups for the per-template worst group.

    Returns:
        ``{"templates": {t: {"accuracy", "groups": {g: acc}, "worst_group",
        "worst_group_accuracy"}}, "mean", "std", "range", "min", "max", "ensemble_accuracy",
        "protocol"}``.
    """
    images = F.normalize(as_embeddings(image_emb, "image_emb"), dim=1)
    y = as_labels(labels, "labels", images.shape[0])
    try:
        prompts = prompt_embeddings(encode_text, class_names, templates)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    if prompts.shape[2] != images.shape[1]:
        raise AuditError(f"encode_text: expected {images.shape[1]}-d text embeddings like "
                         f"image_emb, got {prompts.shape[2]}-d")
    g_codes, g_names = (encode(groups, "groups", len(y)) if groups is not None
                        else (np.zeros(len(y), dtype=np.int64), ["all"]))
    per_template: dict[str, Any] = {}
    accs = []
    for i, template in enumerate(templates):
        correct = (zero_shot_predict(images, prompts[i]) == y).double().numpy()
        acc = float(correct.mean())
        accs.append(acc)
        by_group = {name: float(correct[g_codes == g].mean()) for g, name in enumerate(g_names)}
        worst = min(by_group, key=by_group.get)
        per_template[template] = {"accuracy": acc, "groups": by_group, "worst_group": worst,
                                  "worst_group_accuracy": by_group[worst]}
    ensemble = float((zero_shot_predict(images, class_embeddings(prompts)) == y)
                     .double().mean())
    a = np.asarray(accs)
    worst_counts: dict[str, int] = {}
    for v in per_template.values():
        worst_counts[v["worst_group"]] = worst_counts.get(v["worst_group"], 0) + 1
    return {
        "templates": per_template,
        "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
        "max": float(a.max()), "range": float(a.max() - a.min()),
        "ensemble_accuracy": ensemble,
        "worst_group_counts": worst_counts,
        "protocol": {
            "name": "prompt sensitivity of zero-shot classification",
            "reference": "Radford et al., 2021",
            "per_template": "zero-shot top-1 accuracy with that template alone",
            "std": "population standard deviation over templates",
            "range": "max - min accuracy over templates",
            "ensemble": "mean of the normalised prompt embeddings over templates",
            "classes": list(class_names),
            "n_templates": len(templates),
            "n_images": int(images.shape[0]),
            "chance": 1.0 / len(class_names),
        },
    }


__all__ = ["prompt_sensitivity"]
