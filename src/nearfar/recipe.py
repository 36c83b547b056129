"""Recipes: small TOML files that name a source, views, a method and trainer settings.

A recipe is validated on load against the schema below: an unknown key or a value of
the wrong type is a `RecipeError` that names the key and says what is allowed.
Sections whose keys depend on a chosen component (`[encoder]`, `[method]`) are checked
against that component's constructor when the run is built.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from nearfar.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RecipeError(ValueError):
    """A recipe key is unknown, has the wrong type, or an override is malformed."""


# (type or tuple of types, default). float keys accept ints. "open" sections take a
# `name` plus that component's constructor keywords, checked when the run is built.
SCHEMA: dict[str, Any] = {
    "name": (str, "simclr-mnist5k"),
    "seed": (int, 0),
    "device": (str, "auto"),
    "data": {
        "source": (str, "mnist5k"),        # a bundled dataset name, or folder | manifest | shards
        "path": (str, ""),                 # for folder / manifest / shards (dir or {..} pattern)
        "test_size": (float, 1000),        # items (>= 1) or a fraction (< 1)
        "image_size": (int, 0),            # 0: keep (folder/manifest: first image's size)
        "grayscale": (bool, False),
        "strict": (bool, False),
    },
    "views": {
        "preset": (str, "mnist"),          # mnist | temporal | none; used when `ops` is empty
        "ops": (list, []),                 # [{name = "...", ...}, ...]
    },
    "encoder": "open",                     # name = "small_cnn" + constructor keywords
    "method": "open",                      # name = "simclr" + method keywords
    "trainer": {},                         # filled from TrainConfig below
    "eval": {
        "knn_k": (int, 20),
        "knn_temperature": (float, 0.07),
        "linear_probe": (bool, True),
        "probe_epochs": (int, 100),
    },
    "card": {                              # unset: the card's defaults (nearfar.card)
        "intended_uses": ((list, type(None)), None),
        "out_of_scope_uses": ((list, type(None)), None),
    },
}

_ANNOTATION_TYPES: dict[str, Any] = {
    "int": int, "float": float, "str": str, "bool": bool,
    "float | None": (float, type(None)), "int | None": (int, type(None)),
    "tuple[float, float]": list,
}


def _trainer_schema() -> dict[str, Any]:
    """The [trainer] keys are TrainConfig's fields (device and seed live at the top)."""
    schema = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("device", "seed"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        schema[f.name] = (_ANNOTATION_TYPES.get(str(f.type), object), default)
    return schema


SCHEMA["trainer"] = _trainer_schema()

OPEN_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {"name": "small_cnn"},
    "method": {"name": "simclr"},
}


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false",
            list: "a list", dict: "a table", type(None): "unset"}.get(t, t.__name__)


def _check_value(key: str, value: Any, expected: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and (
            expected is float or (isinstance(expected, tuple) and float in expected)):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise RecipeError(f"recipe.{key}: expected {_type_name(expected)}, got {value!r}")
    if not isinstance(value, expected):
        raise RecipeError(f"recipe.{key}: expected {_type_name(expected)}, got {value!r}")
    return value


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        if spec == "open":
            out[key] = copy.deepcopy(OPEN_DEFAULTS[key])
        elif isinstance(spec, dict):
            out[key] = {k: copy.deepcopy(v[1]) for k, v in spec.items()}
        else:
            out[key] = spec[1]
    return out


def validate(raw: dict[str, Any]) -> dict[str, Any]:
    """Merge `raw` over the defaults, checking every key and type."""
    recipe = _defaults()
    for key, value in raw.items():
        if key not in SCHEMA:
            raise RecipeError(
                f"recipe.{key}: unknown key; allowed top-level keys: {', '.join(SCHEMA)}"
            )
        spec = SCHEMA[key]
        if spec == "open":
            if not isinstance(value, dict):
                raise RecipeError(f"recipe.{key}: expected a table, got {value!r}")
            if "name" in value and not isinstance(value["name"], str):
                raise RecipeError(f"recipe.{key}.name: expected a string, got {value['name']!r}")
            if "name" in value and value["name"] != recipe[key]["name"]:
                recipe[key] = {}  # a different component: drop the default's keywords
            recipe[key].update(value)
        elif isinstance(spec, dict):
            if not isinstance(value, dict):
                raise RecipeError(f"recipe.{key}: expected a table, got {value!r}")
            for sub, subval in value.items():
                if sub not in spec:
                    raise RecipeError(
                        f"recipe.{key}.{sub}: unknown key; allowed in [{key}]: {', '.join(spec)}"
                    )
                recipe[key][sub] = _check_value(f"{key}.{sub}", subval, spec[sub][0])
        else:
            recipe[key] = _check_value(key, value, spec[0])
    for sub, uses in recipe["card"].items():
        if uses is not None and any(not isinstance(u, str) or not u.strip() for u in uses):
            raise RecipeError(f"recipe.card.{sub}: expected a list of non-empty strings, "
                              f"got {uses!r}")
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.lr=1e-3` -> (["trainer", "lr"], 0.001); values are parsed as TOML."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key=value, e.g. trainer.steps=200")
    key, value = text.split("=", 1)
    key = key.strip()
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word: treat as a string
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {text!r}: {part} is not a table")
        node[path[-1]] = value
    return raw


@dataclass
class Recipe:
    """A validated recipe (plain nested dicts) and where it came from."""

    values: dict[str, Any]
    source: str = "default"
    raw: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a TOML recipe; `None` loads the packaged default recipe."""
    if path is None:
        text = resources.files("nearfar.recipes").joinpath("default.toml").read_text("utf-8")
        source = "nearfar/recipes/default.toml"
    else:
        p = Path(path)
        if not p.exists():
            packaged = resources.files("nearfar.recipes").joinpath(f"{p.name}")
            if not p.suffix and resources.files("nearfar.recipes").joinpath(
                    f"{p.name}.toml").is_file():
                packaged = resources.files("nearfar.recipes").joinpath(f"{p.name}.toml")
            if not packaged.is_file():
                raise RecipeError(f"recipe {str(path)!r}: no such file (and no packaged recipe "
                                  f"of that name; try `nearfar train` with no argument)")
            text, source = packaged.read_text("utf-8"), f"nearfar/recipes/{packaged.name}"
        else:
            text, source = p.read_text("utf-8"), str(p)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {source}: not valid TOML ({exc})") from None
    raw = apply_overrides(raw, overrides or [])
    return Recipe(values=validate(raw), source=source, raw=raw)


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Build a validated recipe from Python (same checks as a TOML file)."""
    return Recipe(values=validate(raw), source="python", raw=copy.deepcopy(raw))
