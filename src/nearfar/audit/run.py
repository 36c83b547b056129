"""Audit a trained run: embed its data, run every audit, write audit.json / audit.html.

    from nearfar.audit.run import audit_run
    paths, record = audit_run("runs/x", group_by="group", subject_by="subject",
                              sensitive="sex", shift="noise")

The audit is written to ``RUN_DIR/audit.json`` by default, where the index looks for T*
(:func:`nearfar.index.threshold.find_t_star`); when the card module offers
``attach_audit(run_dir, audit_path)`` the audit is also attached to the run's card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from nearfar.api import Encoder, RunError, load, load_source, split_source
from nearfar.audit.groups import AuditError
from nearfar.audit.report import AUDIT_JSON, write_report
from nearfar.audit.shifts import SHIFTS, corrupt
from nearfar.audit.suite import PromptSet, ShiftedSet, audit_embeddings
from nearfar.audit.threshold import DEFAULT_TARGET_FMR
from nearfar.data import ImageDataset
from nearfar.durable import sha256_file
from nearfar.recipe import RecipeError, recipe_from_dict


def _run_values(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "recipe.json"
    if not path.is_file():
        raise RunError(f"{path}: missing; is {run_dir} a directory made by `nearfar train`?")
    try:
        return recipe_from_dict(json.loads(path.read_text("utf-8"))["recipe"]).values
    except (json.JSONDecodeError, RecipeError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: cannot be read ({exc})") from None


def _column(ds: ImageDataset, column: str | None, option: str) -> list[Any] | None:
    if column is None:
        return None
    if column not in ds.meta:
        raise AuditError(f"{option}: no metadata column {column!r} in the data; columns: "
                         f"{', '.join(sorted(ds.meta))}")
    return list(ds.meta[column])


def _embed(enc: Encoder, images: torch.Tensor) -> torch.Tensor:
    return enc.embed(images)


def audit_run(run_dir: str | os.PathLike, *, group_by: str, data: dict[str, Any] | None = None,
              split: str = "test", subject_by: str | None = None, sensitive: str | None = None,
              shift: str | None = None, shift_data: dict[str, Any] | None = None,
              target_fmr: float = DEFAULT_TARGET_FMR, out: str | os.PathLike | None = None,
              html: bool = True, k: int = 10, n_boot: int = 1000, seed: int = 0,
              device: str = "auto") -> tuple[dict[str, Path], dict[str, Any]]:
    """Audit the encoder of ``run_dir`` on its data (or ``data``); see the module docstring.

    Args:
        group_by: metadata column whose values are the groups compared.
        data: a [data]-style table (``{"source": "folder", "path": ...}``) replacing the
            run's own data.
        split: ``"test"`` (the run's held-out split, default) or ``"all"``.
        subject_by: metadata column naming each item's subject.
        sensitive: metadata column for the attribute-leakage probe.
        shift: a corruption from :data:`SHIFTS` for the out-of-domain audit.
        shift_data: or a [data]-style table of another dataset (same label space).
        target_fmr: the FMR that fixes the global threshold T*.
        out: output directory (default ``run_dir``, where the index reads T*).
        html: also write audit.html.
        k, n_boot, seed: neighbours, bootstrap replicates, seed.
        device: where to embed.

    Returns:
        (paths written, the audit record).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: no such run directory")
    if split not in ("test", "all"):
        raise AuditError(f"split: expected 'test' or 'all', got {split!r}")
    if shift is not None and shift_data is not None:
        raise AuditError("shift: give a corruption (--shift) or another dataset "
                         "(--shift-source), not both")
    values = _run_values(run)
    if values["method"]["name"] == "dual_encoder":
        raise AuditError(f"{run}: a text-pair run (dual encoder); `nearfar audit` audits image "
                         f"encoders. Score a text encoder per group with nearfar.audit's "
                         f"functions on its query / document embeddings "
                         f"(nearfar.load(run).embed_queries)")
    enc = load(run, device=device)
    data_cfg = dict(values["data"])
    if data:
        data_cfg.update(data)
    ds = load_source(data_cfg)
    if ds.image_shape != enc.image_shape:
        raise RunError(f"data: images of shape {ds.image_shape} do not fit this encoder "
                       f"(trained on {enc.image_shape}); set data.image_size / grayscale")
    if split == "test":
        ds = split_source(ds, data_cfg, values["seed"])[1]
    groups = _column(ds, group_by, "--group-by")
    subjects = _column(ds, subject_by, "--subject-by")
    sens = _column(ds, sensitive, "--sensitive")
    emb = _embed(enc, ds.images)

    shifted = None
    if shift is not None:
        shifted = ShiftedSet(_embed(enc, corrupt(ds.images, shift, seed=seed)), ds.labels,
                             f"{shift}: {SHIFTS[shift]}", aligned=True)
    elif shift_data is not None:
        other_cfg = {**data_cfg, **shift_data}
        other = load_source(other_cfg)
        if other.image_shape != enc.image_shape:
            raise RunError(f"shift data: images of shape {other.image_shape} do not fit this "
                           f"encoder (trained on {enc.image_shape})")
        if other.labels is None:
            raise AuditError("shift data: has no labels; the out-of-domain gap needs them")
        shifted = ShiftedSet(_embed(enc, other.images), other.labels,
                             f"another dataset: {other.name}", aligned=False)

    prompts = None
    encode_text = getattr(enc.method, "encode_text", None)
    if callable(encode_text) and ds.labels is not None and ds.num_classes >= 2:
        from nearfar.data.captions import prompt_templates

        def text(texts: list[str]) -> torch.Tensor:
            with torch.no_grad():
                return encode_text(texts).detach().float().cpu()

        prompts = PromptSet(ds.classes, list(prompt_templates(ds.name)), text)

    result = audit_embeddings(emb, groups=groups, labels=ds.labels, subjects=subjects,
                              sensitive=sens, shifted=shifted, prompts=prompts, k=k,
                              target_fmr=target_fmr, n_boot=n_boot, seed=seed)
    record = result.record
    weights = run / "weights.safetensors"
    record.update({
        "run_dir": str(run),
        "encoder": {"weights_sha256": sha256_file(weights) if weights.is_file() else None,
                    "embedding_dim": enc.embedding_dim},
        "data": {"name": ds.name, "version": ds.version, "sha256": ds.sha256(),
                 "n_items": len(ds), "split": split if split == "all" else
                 f"the run's held-out test split (seed {values['seed']})"},
        "group_by": group_by, "subject_by": subject_by, "sensitive": sensitive,
        "shift": shifted.name if shifted is not None else None,
    })
    out_dir = Path(out) if out is not None else run
    paths = write_report(out_dir, record, result.plots, html_report=html)
    record["card"] = _attach(run, paths["json"])
    return paths, record


def _attach(run: Path, audit_path: Path) -> str:
    """Attach the audit to the run's card (by sha256) when the card module offers
    ``attach_audit``; says what happened (a run without a card keeps its audit file)."""
    from nearfar import card

    attach = getattr(card, "attach_audit", None)
    if not callable(attach):
        return "not attached: this nearfar has no card.attach_audit"
    try:
        entry = attach(run, audit_path)
    except (FileNotFoundError, ValueError) as exc:
        return f"not attached: {exc}"
    return f"attached to {run / card.CARD_JSON} (sha256 {str(entry.get('sha256'))[:12]}...)"


__all__ = ["AUDIT_JSON", "SHIFTS", "audit_run", "corrupt"]
