"""What can be known about whether an item was in the encoder's training data.

The card records the training dataset by name, version, source, sha256 of its images
and labels, and the split sizes and seed; it lists no items. Per-item membership is
therefore known only when the training split can be rebuilt: at ``index build`` the
run's recipe (``recipe.json``) is reloaded, its data source read again, and its sha256
compared with the card's ``dataset.sha256``; when they match, the split is redrawn
with the recipe's seed and test size (the split is a pure function of them) and the
index stores salted digests of the training ids, subjects and image bytes in
``training_record.json``. When the data cannot be read or no longer matches, the
record says so and every answer is "unknown".

Answers, per deleted item:

- ``yes``: its id is in the rebuilt training split of the same dataset, or its image
  bytes equal a training image's;
- ``no``: it comes from the training dataset but from the held-out split, or (from
  other data) no training image has identical bytes. Near-duplicates, other images of
  the same person or object, and data the encoder saw before this run (pretraining)
  are not ruled out;
- ``unknown``: no usable record, or an item from other data whose pixels were not given.

Whatever the answer, deleting from the index does not remove an item's influence on
the encoder's weights: that needs retraining without it, then rebuilding the index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nearfar.index.store import Item, content_bytes, salted_sha256

FORMAT = "nearfar-training-record/1"
UNLEARNING_NOTE = ("Deleting from the index removes the item from search; it does not remove "
                   "its influence on the encoder's weights. If it was in the training data, "
                   "retrain without it and rebuild the index to remove that.")


def _unavailable(reason: str, card_dataset: dict[str, Any] | None) -> dict[str, Any]:
    ds = card_dataset or {}
    return {"format": FORMAT, "status": "unavailable",
            "basis": f"{reason}; the card records only dataset {ds.get('name')!r} "
                     f"(sha256 {str(ds.get('sha256'))[:12]}..., splits {ds.get('splits')}), "
                     f"no per-item list",
            "dataset": {"name": ds.get("name"), "sha256": ds.get("sha256")}}


def build_training_record(run_dir: str | os.PathLike, card: dict[str, Any] | None, *,
                          salt: bytes, subject_field: str = "subject",
                          dataset: Any = None) -> dict[str, Any]:
    """Rebuild the run's training split and record salted digests of its items.

    Args:
        dataset: the run's full dataset if already loaded (saves reading it again).
    """
    from nearfar.api import load_source, split_source
    from nearfar.recipe import recipe_from_dict

    card_ds = (card or {}).get("dataset") or None
    if not card_ds or not card_ds.get("sha256"):
        return _unavailable("the run has no card with a dataset sha256", card_ds)
    try:
        saved = json.loads((Path(run_dir) / "recipe.json").read_text("utf-8"))
        values = recipe_from_dict(saved["recipe"]).values
    except (OSError, ValueError, KeyError) as exc:
        return _unavailable(f"the run's recipe.json cannot be read ({exc})", card_ds)
    try:
        ds = dataset if dataset is not None else load_source(values["data"])
    except (OSError, ValueError) as exc:
        return _unavailable(f"the training data cannot be read again ({exc})", card_ds)
    sha = ds.sha256()
    if sha != card_ds["sha256"]:
        return _unavailable(f"the data at the recipe's source now hashes to {sha[:12]}..., "
                            f"not the card's dataset.sha256", card_ds)
    train, test = split_source(ds, values["data"], values["seed"])
    splits = card_ds.get("splits") or {}
    if splits.get("train") not in (None, len(train)):
        return _unavailable(f"the rebuilt split has {len(train)} training items, the card "
                            f"{splits.get('train')}", card_ds)
    has_subjects = subject_field in train.meta
    images = train.images
    uint8 = str(images.dtype) == "torch.uint8"
    return {
        "format": FORMAT,
        "status": "reconstructed",
        "basis": (f"training split rebuilt from recipe.json (seed {values['seed']}, test_size "
                  f"{values['data']['test_size']:g}) over {card_ds.get('name')!r}, whose sha256 "
                  f"matches the card's dataset.sha256"),
        "dataset": {"name": card_ds.get("name"), "sha256": sha, "n_train": len(train),
                    "n_test": len(test)},
        "subject_field": subject_field,
        "has_subjects": has_subjects,
        "id_sha256": sorted(salted_sha256(salt, "id", str(x).encode()) for x in train.meta["id"]),
        "subject_sha256": sorted({salted_sha256(salt, "subject", str(s).encode())
                                  for s in train.meta[subject_field]}) if has_subjects else None,
        "content_sha256": sorted(salted_sha256(salt, "content", content_bytes(img.numpy()))
                                 for img in images) if uint8 else [],
    }


class Membership:
    """Lookups against a stored training record (sets built once)."""

    def __init__(self, record: dict[str, Any] | None) -> None:
        self.record = record
        ok = bool(record) and record.get("status") == "reconstructed"
        self.ok = ok
        self.ids = frozenset(record.get("id_sha256") or []) if ok else frozenset()
        self.contents = frozenset(record.get("content_sha256") or []) if ok else frozenset()
        self.subjects = frozenset(record.get("subject_sha256") or []) if ok else frozenset()
        self.dataset_sha = (record or {}).get("dataset", {}).get("sha256")

    def _unknown(self) -> dict[str, str]:
        if not self.record:
            return {"in_training_data": "unknown",
                    "basis": "no training record was stored when the index was built"}
        return {"in_training_data": "unknown", "basis": self.record.get("basis", "")}

    def item(self, it: Item, id_sha256: str) -> dict[str, str]:
        if not self.ok:
            return self._unknown()
        n = self.record["dataset"]["n_train"]
        if it.source is not None and it.source == self.dataset_sha:
            if id_sha256 in self.ids:
                return {"in_training_data": "yes",
                        "basis": f"its id is in the training split ({self.record['basis']})"}
            return {"in_training_data": "no",
                    "basis": f"same dataset, but its id is in the held-out split, not among the "
                             f"{n} training items ({self.record['basis']})"}
        if it.content is not None:
            if it.content in self.contents:
                return {"in_training_data": "yes",
                        "basis": "its image bytes are identical to a training image's"}
            return {"in_training_data": "no",
                    "basis": f"not from the training dataset, and no training image of the {n} "
                             f"has identical bytes (near-duplicates are not ruled out)"}
        return {"in_training_data": "unknown",
                "basis": "added from outside the training dataset without its pixels, so it "
                         "cannot be compared with the training items"}

    def subject(self, subject_sha256: str) -> dict[str, str]:
        if not self.ok:
            return self._unknown()
        if not self.record.get("has_subjects"):
            return {"in_training_data": "unknown",
                    "basis": f"the training data has no {self.record.get('subject_field')!r} "
                             f"column, so subjects were not recorded"}
        if subject_sha256 in self.subjects:
            return {"in_training_data": "yes", "basis": "the subject has items in the "
                                                        "training split"}
        return {"in_training_data": "no", "basis": "no training item has this subject"}
