"""Writing an audit: ``audit.json`` (every number with its protocol) and a self-contained
``audit.html`` (figures embedded as base64 PNGs drawn with matplotlib's Agg backend; no
external scripts, styles, fonts or images, so the file can be mailed or archived).

Figures: a 2-D map of the embeddings (PCA: the first two principal components of the
centred embeddings) coloured by group and by label; per-group bars with bootstrap
intervals; FMR / FNMR against the threshold with T* marked, and the DET curve; the
accuracy of each zero-shot prompt template.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from nearfar.durable import atomic_write, atomic_write_json

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"


def plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays to Python, NaN / Inf to None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def write_json(out_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    path = Path(out_dir) / AUDIT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plain(record))
    return path


# ------------------------------------------------------------------ figures

def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.set_layout_engine("constrained")
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _map_figure(plots: dict[str, Any]) -> str | None:
    coords = plots.get("map")
    if coords is None or len(coords) == 0:
        return None
    plt = _pyplot()
    panels = [("group", plots["map_groups"])]
    labels = plots.get("map_labels")
    if labels is not None and [str(v) for v in labels] != list(plots["map_groups"]):
        panels.append(("label", [str(v) for v in plots["map_labels"]]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    var = plots.get("map_variance", [0.0, 0.0])
    for ax, (title, values) in zip(axes[0], panels):
        names = sorted(set(values))
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        values = np.asarray(values)
        for i, name in enumerate(names):
            m = values == name
            ax.scatter(coords[m, 0], coords[m, 1], s=6, alpha=0.7, color=cmap(i % cmap.N),
                       label=name)
        ax.set_title(f"PCA of the embeddings, coloured by {title}")
        ax.set_xlabel(f"PC 1 ({var[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({var[1]:.0%} of variance)")
        if len(names) <= 20:   # outside the axes: "best" placement scans every point
            ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _figure_png(fig)


def _subgroup_figure(section: dict[str, Any]) -> str:
    plt = _pyplot()
    metrics = section["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], metrics.items()):
        groups = list(m["groups"])
        vals = [m["groups"][g]["value"] for g in groups]
        lo = [v - (m["groups"][g]["ci"][0] if m["groups"][g]["ci"][0] is not None else v)
              for g, v in zip(groups, vals)]
        hi = [(m["groups"][g]["ci"][1] if m["groups"][g]["ci"][1] is not None else v) - v
              for g, v in zip(groups, vals)]
        colors = ["#c0392b" if m["groups"][g]["flagged"] else "#2e86c1" for g in groups]
        ax.bar(range(len(groups)), vals, yerr=[lo, hi], capsize=4, color=colors)
        ax.axhline(m["overall"]["value"], color="k", ls="--", lw=1, label="overall")
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_title(f"{name} per group (bars: bootstrap interval; red: flagged)", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    return _figure_png(fig)


def _threshold_figure(section: dict[str, Any]) -> str:
    from scipy.special import ndtri

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.4, 4))
    t = np.asarray(section["curves"]["threshold"])
    fmr = np.asarray(section["curves"]["fmr"], dtype=float)
    fnmr = np.asarray(section["curves"]["fnmr"], dtype=float)
    floor = 0.5 / max(section["n_impostor"], 1)
    ax1.semilogy(t, np.maximum(fmr, floor), label="FMR")
    ax1.semilogy(t, np.maximum(fnmr, floor), label="FNMR")
    ax1.axvline(section["t_star"], color="k", ls="--", lw=1,
                label=f"T* = {section['t_star']:.3f} (FMR {section['target_fmr']:g})")
    ax1.set_xlabel("threshold (cosine similarity)")
    ax1.set_ylabel("error rate (log)")
    ax1.set_title("FMR and FNMR against the threshold", fontsize=9)
    ax1.legend(fontsize=7)
    eps = 1e-6
    ok = (fmr > 0) & (fnmr > 0) & (fmr < 1) & (fnmr < 1)
    dx, dy = ndtri(np.clip(fmr[ok], eps, 1 - eps)), ndtri(np.clip(fnmr[ok], eps, 1 - eps))
    ax2.plot(dx, dy)
    ticks = np.array([1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8, 0.95])
    for values, axis in ((dx, ax2.xaxis), (dy, ax2.yaxis)):
        if len(values):
            lo, hi = values.min() - 0.2, values.max() + 0.2
            keep = (ndtri(ticks) >= lo) & (ndtri(ticks) <= hi)
            axis.set_ticks(ndtri(ticks[keep]), [f"{v:g}" for v in ticks[keep]])
            (ax2.set_xlim if axis is ax2.xaxis else ax2.set_ylim)(lo, hi)
    ax2.set_xlabel("FMR (normal deviate scale)")
    ax2.set_ylabel("FNMR (normal deviate scale)")
    ax2.set_title("DET curve (Martin et al., 1997)", fontsize=9)
    return _figure_png(fig)


def _prompt_figure(section: dict[str, Any]) -> str:
    plt = _pyplot()
    templates = list(section["templates"])
    accs = [section["templates"][t]["accuracy"] for t in templates]
    worst = [section["templates"][t]["worst_group_accuracy"] for t in templates]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(templates) + 1.8))
    y = np.arange(len(templates))
    ax.barh(y, accs, color="#2e86c1", label="accuracy")
    ax.scatter(worst, y, color="#c0392b", zorder=3, label="worst group")
    ax.axvline(section["mean"], color="k", ls="--", lw=1,
               label=f"mean {section['mean']:.3f} (std {section['std']:.3f})")
    ax.set_yticks(y, templates, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("zero-shot accuracy")
    ax.set_title("accuracy per prompt template", fontsize=9)
    ax.legend(fontsize=7)
    return _figure_png(fig)


# ------------------------------------------------------------------ HTML

def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (float, type(None)))
                                                   for x in v):
        return f"[{_fmt(v[0])}, {_fmt(v[1])}]"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(b64: str | None, alt: str) -> str:
    if not b64:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _protocol(p: dict[str, Any]) -> str:
    items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(json.dumps(v) if not isinstance(v, str) else v)}</li>"  # noqa: E501
                    for k, v in p.items())
    return f"<details><summary>protocol</summary><ul>{items}</ul></details>"


_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #bbb;padding:3px 8px;
font-size:13px;text-align:right}th{background:#eee}img{max-width:100%}.flag{color:#c0392b}
.ok{color:#1e8449}"""


def render_html(record: dict[str, Any], plots: dict[str, Any]) -> str:
    """The self-contained HTML page of an audit record."""
    rec = plain(record)
    s = rec["sections"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>nearfar audit"
             f"</title><style>{_STYLE}</style></head><body><h1>nearfar audit</h1>"]
    meta = [["run", rec.get("run_dir")], ["data", (rec.get("data") or {}).get("name")],
            ["items", rec["n_items"]], ["group by", rec.get("group_by")],
            ["subject by", rec.get("subject_by")], ["sensitive", rec.get("sensitive")],
            ["T*", rec.get("t_star")], ["target FMR", rec.get("target_fmr")]]
    parts.append(_table(["", "value"], [m for m in meta if m[1] is not None]))
    if rec["flags"]:
        parts.append("<h2 class='flag'>Flags</h2><ul>" + "".join(
            f"<li class='flag'>{html.escape(f['why'])}</li>" for f in rec["flags"]) + "</ul>")
    else:
        parts.append("<h2 class='ok'>No flags</h2>")
    parts.append("<h2>Embedding map</h2>" + _img(_map_figure(plots), "2-D map (PCA)")
                 + "<p>PCA: first two principal components of the centred embeddings.</p>")
    if "subgroup" in s:
        sub = s["subgroup"]
        parts.append("<h2>Subgroup performance</h2>" + _img(_subgroup_figure(sub),
                                                             "per-group bars"))
        for name, m in sub["metrics"].items():
            rows = [[g, v["value"], v["ci"], v["gap"], v["gap_ci"], v["ratio"], v["n_items"],
                     v["n_units"], "FLAG" if v["flagged"] else ""]
                    for g, v in m["groups"].items()]
            rows.append(["overall", m["overall"]["value"], m["overall"]["ci"], 0.0, None, 1.0,
                         m["overall"]["n_items"], m["overall"]["n_units"], ""])
            parts.append(f"<h3>{html.escape(name)}</h3>" + _table(
                ["group", "value", "interval", "gap", "gap interval", "ratio", "items",
                 "resampled units", ""], rows))
            b = m["between_groups"]
            parts.append(f"<p>best {_fmt(b['best'])}, worst {_fmt(b['worst'])}: gap "
                         f"{_fmt(b['max_gap'])} {_fmt(b['max_gap_ci'])}, ratio "
                         f"{_fmt(b['min_ratio'])} {_fmt(b['min_ratio_ci'])}</p>")
        parts.append(_protocol(sub["protocol"]))
    nb = s["neighbours"]
    rows = [[g, nb["own_group"][g]["share"], nb["own_group"][g]["base_rate"],
             nb["own_group"][g]["enrichment"], h["relative_k_occurrence"], h["skewness"],
             h["hub_share"], h["antihub_share"]] for g, h in nb["hubness"]["groups"].items()]
    parts.append("<h2>Nearest neighbours</h2>" + _table(
        ["group", "own-group share", "base rate", "enrichment", "mean N_k / k", "skewness",
         "hub share", "antihub share"], rows)
        + f"<p>overall k-occurrence skewness {_fmt(nb['hubness']['overall']['skewness'])}</p>"
        + _protocol(nb["protocol"]))
    if "threshold" in s:
        th = s["threshold"]
        rows = [[g, v["fmr"], v["fmr_ci"], v["fmr_ratio"], v["fnmr"], v["fnmr_ci"],
                 v["fnmr_ratio"], v["n_impostor"], v["n_genuine"]]
                for g, v in th["groups"].items()]
        groups = list(th["impostor_matrix"])
        matrix = [[g] + [th["impostor_matrix"][g][h] for h in groups] for g in groups]
        parts.append("<h2>Threshold sensitivity</h2>"
                     f"<p>T* = {_fmt(th['t_star'])} at target FMR {_fmt(th['target_fmr'])} "
                     f"(achieved {_fmt(th['achieved_fmr'])}; FNMR {_fmt(th['fnmr_at_t_star'])})"
                     "</p>" + _img(_threshold_figure(th), "threshold curves")
                     + _table(["group", "FMR", "interval", "/ overall", "FNMR", "interval",
                               "/ overall", "impostor pairs", "genuine pairs"], rows)
                     + "<h3>Cross-group impostor FMR at T*</h3>"
                     + _table([""] + groups, matrix) + _protocol(th["protocol"]))
    if "prompts" in s:
        pr = s["prompts"]
        rows = [[t, v["accuracy"], v["worst_group"], v["worst_group_accuracy"]]
                for t, v in pr["templates"].items()]
        parts.append("<h2>Prompt sensitivity</h2>" + _img(_prompt_figure(pr), "prompt spread")
                     + _table(["template", "accuracy", "worst group", "its accuracy"], rows)
                     + f"<p>mean {_fmt(pr['mean'])}, std {_fmt(pr['std'])}, range "
                       f"{_fmt(pr['range'])}; ensemble {_fmt(pr['ensemble_accuracy'])}</p>"
                     + _protocol(pr["protocol"]))
    if "ood" in s:
        o = s["ood"]
        dc = o["domain_classifier"]
        parts.append("<h2>Out-of-domain</h2>" + _table(
            ["shift", "in-domain", "shifted", "gap", "domain AUROC", "domain accuracy"],
            [[o["shift"], o["in_domain"], o["shifted"], o["gap"], dc["auroc"],
              dc["accuracy"]]]) + _protocol(o["protocol"]) + _protocol(dc["protocol"]))
    if "leakage" in s:
        lk = s["leakage"]
        parts.append("<h2>Attribute leakage</h2>" + _table(
            ["probe", "majority", "shuffled control", "selectivity", "p", "flagged"],
            [[lk["probe_accuracy"], lk["majority_baseline"], lk["control_accuracy"],
              lk["selectivity"], lk["p_value"], "yes" if lk["flagged"] else "no"]])
            + _protocol(lk["protocol"]))
    if rec.get("skipped"):
        parts.append("<h2>Not run</h2><ul>" + "".join(
            f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in rec["skipped"].items())
            + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: str | os.PathLike, record: dict[str, Any],
                 plots: dict[str, Any] | None = None, *, html_report: bool = True
                 ) -> dict[str, Path]:
    """Write ``audit.json`` (and ``audit.html`` unless ``html_report`` is False) into
    ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = {"json": write_json(out, record)}
    if html_report:
        page = render_html(record, plots or {})
        atomic_write(out / AUDIT_HTML, page.encode("utf-8"))
        paths["html"] = out / AUDIT_HTML
    return paths


__all__ = ["AUDIT_HTML", "AUDIT_JSON", "plain", "render_html", "write_json", "write_report"]
