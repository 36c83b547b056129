"""Audits of a trained encoder: subgroups, neighbours, thresholds, prompts, out-of-domain
shift and attribute leakage; written as ``audit.json`` and a self-contained ``audit.html``.

A layer above :mod:`nearfar.evaluate` and below the command line. Every audit is a pure
function of embeddings, labels, groups and subjects (so effects can be planted in tests
without training); :func:`nearfar.audit.run.audit_run` embeds a run's data and calls them.

    from nearfar.audit import audit_embeddings, write_report
    result = audit_embeddings(emb, groups=groups, labels=labels, subjects=subjects)
    write_report("runs/x", result.record, result.plots)
"""

from nearfar.audit.groups import AuditError
from nearfar.audit.item_scores import knn_item_scores
from nearfar.audit.leakage import attribute_leakage
from nearfar.audit.neighbours import neighbour_composition
from nearfar.audit.ood import domain_classifier, domain_shift
from nearfar.audit.prompts import prompt_sensitivity
from nearfar.audit.report import render_html, write_report
from nearfar.audit.subgroup import subgroup_performance
from nearfar.audit.suite import AuditResult, PromptSet, ShiftedSet, audit_embeddings
from nearfar.audit.threshold import (
    DEFAULT_TARGET_FMR,
    error_rates,
    threshold_at_fmr,
    threshold_audit,
)

__all__ = ["DEFAULT_TARGET_FMR", "AuditError", "AuditResult", "PromptSet", "ShiftedSet",
           "attribute_leakage", "audit_embeddings", "domain_classifier", "domain_shift",
           "error_rates", "knn_item_scores", "neighbour_composition", "prompt_sensitivity",
           "render_html", "subgroup_performance", "threshold_at_fmr", "threshold_audit",
           "write_report"]
