"""Every audit on one set of embeddings, as plain data: the pure core of `nearfar audit`.

    result = audit_embeddings(emb, labels=y, groups=meta["group"], subjects=meta["subject"],
                              sensitive=meta["sex"])
    result.record["flags"]        # what the audit found, each with its reason
    result.record["t_star"]       # the global threshold at the target FMR

Nothing here touches a run directory or a model, so tests can plant effects in
embeddings directly (:mod:`nearfar.audit.run` embeds a run's data and calls this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nearfar.audit.groups import AuditError, encode
from nearfar.audit.item_scores import knn_item_scores
from nearfar.audit.leakage import attribute_leakage
from nearfar.audit.neighbours import neighbour_composition
from nearfar.audit.ood import domain_shift
from nearfar.audit.prompts import prompt_sensitivity
from nearfar.audit.subgroup import subgroup_performance
from nearfar.audit.threshold import DEFAULT_TARGET_FMR, threshold_audit
from nearfar.evaluate.inputs import as_embeddings, as_labels

AUDIT_VERSION = 1


@dataclass
class ShiftedSet:
    """A shifted copy of the audited data: corrupted copies (``aligned``: row i is a copy
    of item i) or another dataset in the same label space."""

    emb: Any
    labels: Any
    name: str
    aligned: bool = True


@dataclass
class PromptSet:
    """What prompt sensitivity needs: class names, templates and a text encoder."""

    class_names: Sequence[str]
    templates: Sequence[str]
    encode_text: Callable[[list[str]], torch.Tensor]


@dataclass
class AuditResult:
    """``record``: the JSON-ready audit (every number with its protocol); ``plots``: the
    arrays the HTML report draws that do not belong in the JSON (the 2-D map)."""

    record: dict[str, Any]
    plots: dict[str, Any] = field(default_factory=dict)


def pca_2d(emb) -> tuple[np.ndarray, list[float]]:
    """First two principal components of the centred embeddings, and the share of
    variance each explains."""
    x = as_embeddings(emb, "emb").double()
    x = x - x.mean(0)
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    coords = (x @ v[:2].T).numpy()
    var = (s**2) / max(float((s**2).sum()), 1e-12)
    return coords, [float(v) for v in var[:2]]


def _summary(sections: dict[str, Any], flags: list[dict[str, Any]], target_fmr: float
             ) -> dict[str, Any]:
    """A few headline numbers (what a card shows next to the audit's hash)."""
    out: dict[str, Any] = {
        "flags": len(flags),
        "flagged": sorted({f"{f['kind']}:{f['group']}" if f.get("group") else f["kind"]
                           for f in flags}),
    }
    if "subgroup" in sections:
        b = sections["subgroup"]["metrics"]["knn_correct"]["between_groups"]
        out.update(knn_worst_group=b["worst"], knn_max_gap=round(b["max_gap"], 6))
    if "threshold" in sections:
        out.update(t_star=round(sections["threshold"]["t_star"], 6), target_fmr=target_fmr)
    if "leakage" in sections:
        out["leakage_selectivity"] = round(sections["leakage"]["selectivity"], 6)
    if "ood" in sections:
        out["ood_gap"] = round(sections["ood"]["gap"], 6)
    return out


def audit_embeddings(emb, *, groups, labels=None, subjects=None, sensitive=None,
                     shifted: ShiftedSet | None = None, prompts: PromptSet | None = None,
                     k: int = 10, temperature: float = 0.07,
                     target_fmr: float = DEFAULT_TARGET_FMR, n_boot: int = 1000,
                     threshold_boot: int = 200, margin: float = 0.02,
                     leakage_margin: float = 0.05, seed: int = 0) -> AuditResult:
    """Run every audit the inputs allow; skipped audits say why.

    Args:
        emb: (N, D) embeddings of the audited items.
        groups: (N,) the group of each item (the ``--group-by`` column).
        labels: (N,) integer labels (kNN metrics, zero-shot, the identity of pairs when
            there are no subjects). Without labels the subgroup metrics are skipped.
        subjects: (N,) optional subject of each item: the bootstrap unit, the identity of
            verification pairs, and what leakage folds keep together.
        sensitive: (N,) optional sensitive attribute for the leakage probe.
        shifted: optional shifted set for the out-of-domain audit.
        prompts: optional prompt set for prompt sensitivity (image-text encoders).
        k, temperature: the kNN protocol of the per-item metrics and neighbour audit.
        target_fmr: the FMR that fixes T*.
        n_boot: subgroup bootstrap replicates; threshold_boot: those at T*.
        margin: subgroup flag margin; leakage_margin: the leakage flag margin.
        seed: every random choice (bootstrap, pair sampling, folds).
    """
    x = as_embeddings(emb, "emb")
    n = x.shape[0]
    group_codes, group_names = encode(groups, "groups", n)
    y = None if labels is None else as_labels(labels, "labels", n)
    subj = None if subjects is None else encode(subjects, "subjects", n)[0]
    sections: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    flags: list[dict[str, Any]] = []

    if y is not None:
        scores = knn_item_scores(x, y, k=k, temperature=temperature, query_ids=subj)
        sub = subgroup_performance(scores, groups, subjects=subj, n_boot=n_boot,
                                   margin=margin, seed=seed)
        sub["protocol"]["metrics"] = {
            "knn_correct": f"leave-one-out weighted kNN top-1 (Wu et al., 2018; k = {k}, "
                           f"T = {temperature:g}, cosine)" + (", the item's own subject "
                                                              "excluded" if subj is not None
                                                              else ""),
            "neighbour_precision": f"share of the k = {k} nearest neighbours with the item's "
                                   "label (precision@k)"}
        sections["subgroup"] = sub
        flags += sub["flags"]
    else:
        skipped["subgroup"] = "no labels: per-item kNN metrics need labels"

    sections["neighbours"] = neighbour_composition(x, groups, k=k, subjects=subj)

    identities = subj if subj is not None else (None if y is None else y.numpy())
    if identities is not None:
        try:
            sections["threshold"] = threshold_audit(x, identities, groups, subjects=subj,
                                                    target_fmr=target_fmr,
                                                    n_boot=threshold_boot, seed=seed)
        except AuditError as exc:
            skipped["threshold"] = str(exc)
    else:
        skipped["threshold"] = "no subjects and no labels: genuine pairs cannot be formed"

    if prompts is not None:
        if y is None:
            skipped["prompts"] = "no labels to score zero-shot predictions against"
        else:
            try:
                sections["prompts"] = prompt_sensitivity(x, y, prompts.class_names,
                                                         prompts.templates, prompts.encode_text,
                                                         groups=groups)
            except AuditError as exc:
                skipped["prompts"] = str(exc)
    else:
        skipped["prompts"] = "no text encoder (not an image-text run) or no prompts"

    if shifted is not None:
        if y is None:
            skipped["ood"] = "no labels: the metric gap needs labels"
        else:
            ood = domain_shift(x, y, shifted.emb, shifted.labels, aligned=shifted.aligned,
                               subjects=subj if shifted.aligned else None, k=k,
                               temperature=temperature, shift=shifted.name, seed=seed)
            ood.pop("_item_scores")
            sections["ood"] = ood
    else:
        skipped["ood"] = "no shifted set given (--shift)"

    if sensitive is not None:
        try:
            leak = attribute_leakage(x, sensitive, subjects=subj, margin=leakage_margin,
                                     seed=seed)
        except AuditError as exc:
            leak = None
            skipped["leakage"] = str(exc)
        if leak is not None:
            sections["leakage"] = leak
        if leak is not None and leak["flagged"]:
            flags.append({
                "kind": "leakage", "probe_accuracy": leak["probe_accuracy"],
                "majority_baseline": leak["majority_baseline"],
                "control_accuracy": leak["control_accuracy"],
                "why": f"a linear probe reads the sensitive attribute at "
                       f"{leak['probe_accuracy']:.3f} held-out accuracy against "
                       f"{leak['majority_baseline']:.3f} (majority) and "
                       f"{leak['control_accuracy']:.3f} (shuffled control); p = "
                       f"{leak['p_value']:.2g}"})
    else:
        skipped["leakage"] = "no sensitive column given (--sensitive)"

    record: dict[str, Any] = {
        "kind": "audit",
        "audit_version": AUDIT_VERSION,
        "summary": _summary(sections, flags, target_fmr),
        "t_star": sections["threshold"]["t_star"] if "threshold" in sections else None,
        "target_fmr": float(target_fmr),
        "n_items": n, "dim": int(x.shape[1]),
        "groups": group_names,
        "flags": flags,
        "sections": sections,
        "skipped": skipped,
        "protocol": {
            "embeddings": "frozen encoder output, cosine similarity throughout",
            "t_star": "sections.threshold.t_star, repeated at the top level for the index",
            "seed": seed, "k": k,
        },
    }
    coords, var = pca_2d(x)
    plots = {"map": coords, "map_variance": var,
             "map_groups": [group_names[c] for c in group_codes],
             "map_labels": None if y is None else y.tolist()}
    return AuditResult(record=record, plots=plots)


__all__ = ["AUDIT_VERSION", "AuditResult", "PromptSet", "ShiftedSet", "audit_embeddings",
           "pca_2d"]
