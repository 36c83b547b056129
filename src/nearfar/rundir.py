"""What a run directory holds and how its records are written, shared by the image path
(:mod:`nearfar.api`) and the text-pair path (:mod:`nearfar.api_text`): file names, the
:class:`RunResult`, the trainer settings from a recipe, the card, loading weights, and
process 0's values handed to every process under ``torchrun``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nearfar.card import build_card, encoder_section, write_card
from nearfar.recipe import RecipeError
from nearfar.train import TrainConfig
from nearfar.train.checkpoint import CheckpointError, load_weights

RECIPE_FILE = "recipe.json"
EVAL_FILE = "eval.json"


def train_config(values: dict[str, Any], *, progress: bool | None = None) -> TrainConfig:
    cfg = dict(values["trainer"])
    cfg["seed"], cfg["device"] = values["seed"], values["device"]
    if progress is not None:
        cfg["progress"] = progress
    try:
        return TrainConfig.from_dict(cfg)
    except ValueError as exc:
        raise RecipeError(f"recipe.trainer: {exc}") from None


@dataclass
class RunResult:
    """What :func:`nearfar.api.train` produced: where, how long, and how good on held-out data."""

    run_dir: Path
    fit: dict[str, Any]
    results: list[dict[str, Any]]
    card: dict[str, Any] = field(repr=False)

    def metric(self, name: str) -> float | None:
        for r in self.results:
            if r.get("metric") == name:
                return float(r["value"])
        return None


def on_lead(value: Any, many: bool) -> Any:
    """Process 0's ``value`` on every process (itself when there is one process)."""
    if not many:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_weights_into(method, run_dir: Path) -> None:
    weights = load_weights(run_dir)
    missing, unexpected = method.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{run_dir}: weights do not fit the recipe's model (missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]})")


def make_card(run_dir: Path, method, values: dict[str, Any], dataset: Any,
              train_ds: Any, test_ds: Any, results: list[dict[str, Any]],
              recipe_source: str, protocol: str | None = None) -> dict[str, Any]:
    described = method.describe()
    enc_name = values["encoder"]["name"]
    encoder = encoder_section(architecture=enc_name, weights_path=run_dir / "weights.safetensors",
                              module=method.encoder, embedding_dim=int(method.encoder.out_dim))
    data = dict(dataset.describe())
    data["splits"] = {"train": len(train_ds), "test": len(test_ds),
                      "seed": values["seed"], "stratified": train_ds.labels is not None}
    protocol = protocol or (
        "frozen encoder features (projection head "
        f"{described.get('objective', {}).get('head_downstream', 'dropped')}); "
        "fit on the train split, scored on the held-out test split")
    uses = values.get("card") or {}
    declared = uses.get("intended_uses") is not None or uses.get("out_of_scope_uses") is not None
    card = build_card(method=described, encoder=encoder, dataset=data,
                      evaluation={"protocol": protocol, "results": results},
                      seed=values["seed"], name=values["name"],
                      benchmark={"name": f"{data.get('name', 'data')} held-out split",
                                 "metrics": [r["metric"] for r in results]},
                      intended_uses=uses.get("intended_uses"),
                      out_of_scope_uses=uses.get("out_of_scope_uses"),
                      uses_declared_by="recipe" if declared else "nearfar defaults")
    card["recipe"] = {"source": recipe_source, "values": values}
    write_card(run_dir, card)
    return card


__all__ = ["EVAL_FILE", "RECIPE_FILE", "RunResult", "load_weights_into", "make_card", "on_lead",
           "train_config"]
