"""Train from a recipe, evaluate a run, load a trained encoder: the few-line Python API.

    import nearfar
    run = nearfar.fit()                         # the default recipe on bundled MNIST-5k
    enc = nearfar.load(run.run_dir)
    z = enc.embed(images)                       # (N, D) L2-normalised embeddings

The command line (`nearfar train | eval | card | views`) is a thin layer over this.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nearfar.card import (
    read_card,
    render_markdown,
)
from nearfar.data import (
    ImageDataset,
    load_dataset,
    load_image_folder,
    load_manifest,
    train_test_split,
)
from nearfar.durable import atomic_write_json
from nearfar.evaluate import embed_dataset, knn_accuracy, linear_probe
from nearfar.methods import build_method
from nearfar.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from nearfar.rundir import (
    EVAL_FILE,
    RECIPE_FILE,
    RunResult,
    load_weights_into,
    make_card,
    on_lead,
    train_config,
)
from nearfar.train import Trainer, seed_everything
from nearfar.train.launch import init_distributed, shutdown_distributed
from nearfar.train.trainer import resolve_device
from nearfar.views import build_two_views, default_mnist_views
from nearfar.views.temporal import temporal_signal_pairs

VIEW_PRESETS = {"mnist": default_mnist_views}
# sequences (issue 4): adjacent windows of a signal as the positive pair, and no views
# at all for methods whose positives come from the sequence itself (CPC)
VIEW_PRESETS["temporal"] = temporal_signal_pairs
VIEW_PRESETS["none"] = lambda: None
# encoders whose first argument is the input's channel count
CHANNEL_ENCODERS = ("small_cnn", "resnet18", "conv1d", "conv1d_chunks", "patch_chunks")


class RunError(ValueError):
    """A run directory is missing, incomplete, or does not match what was asked."""


# ------------------------------------------------------------------ building blocks

def as_recipe(recipe: Recipe | dict | str | os.PathLike | None,
              overrides: list[str] | None = None) -> Recipe:
    """A validated :class:`Recipe` from a Recipe, a plain dict, a TOML path, or None."""
    if isinstance(recipe, Recipe):
        if overrides:
            from nearfar.recipe import apply_overrides
            return recipe_from_dict(apply_overrides(recipe.values, overrides))
        return recipe
    if isinstance(recipe, dict):
        from nearfar.recipe import apply_overrides
        return recipe_from_dict(apply_overrides(recipe, overrides or []))
    return load_recipe(recipe, overrides)


def load_source(data: dict[str, Any]) -> ImageDataset:
    """The dataset a recipe's [data] section names (bundled, folder, manifest or tar shards)."""
    source, path = data["source"], data["path"]
    if source == "text_pairs":   # (query, document) pairs from a JSONL / CSV file
        from nearfar.api_text import load_text_source
        return load_text_source(data)
    size = data["image_size"] or None
    gray = True if data["grayscale"] else None
    if source == "folder":
        if not path:
            raise RecipeError("recipe.data.path: expected the image folder for "
                              "source = \"folder\", got nothing")
        return load_image_folder(path, image_size=size, grayscale=gray, strict=data["strict"])
    if source == "manifest":
        if not path:
            raise RecipeError("recipe.data.path: expected a .csv or .jsonl manifest for "
                              "source = \"manifest\", got nothing")
        return load_manifest(path, image_size=size, grayscale=gray, strict=data["strict"])
    if source == "shards":
        if not path:
            raise RecipeError("recipe.data.path: expected tar shards for source = \"shards\" "
                              "(a folder, or a pattern such as data-{000000..000009}.tar), "
                              "got nothing")
        from nearfar.data.shards import load_shards
        return load_shards(path, image_size=size, grayscale=gray, strict=data["strict"])
    try:
        return load_dataset(source)
    except ValueError as exc:
        raise RecipeError(f"recipe.data.source: {exc}; or use \"folder\" / \"manifest\" / "
                          f"\"shards\" with data.path") from None


def split_source(ds: ImageDataset, data: dict[str, Any], seed: int
                 ) -> tuple[ImageDataset, ImageDataset]:
    if "split" in ds.meta:  # a dataset with its own fixed split (shapes: held-out combinations)
        from nearfar.data import predefined_split
        return predefined_split(ds)
    test_size = data["test_size"]
    test_size = int(test_size) if test_size >= 1 else float(test_size)
    return train_test_split(ds, test_size=test_size, seed=seed)


def build_views(views: dict[str, Any]):
    """The positive-pair maker a recipe's [views] section names."""
    if views["ops"]:
        try:
            return build_two_views(views["ops"], where="recipe.views.ops")
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
    preset = views["preset"]
    if preset not in VIEW_PRESETS:
        raise RecipeError(f"recipe.views.preset: unknown preset {preset!r}; known: "
                          f"{', '.join(VIEW_PRESETS)} (or list ops under [[views.ops]])")
    return VIEW_PRESETS[preset]()


def _encoder_kwargs(name: str, given: dict[str, Any], image_shape: tuple[int, int, int]
                    ) -> dict[str, Any]:
    """Fill the input size of the encoder from the data unless the recipe sets it."""
    kwargs = dict(given)
    if name in CHANNEL_ENCODERS:
        kwargs.setdefault("in_channels", image_shape[0])
    elif name == "mlp":
        kwargs.setdefault("in_dim", math.prod(image_shape))
    return kwargs


def build_method_from_recipe(values: dict[str, Any], image_shape: tuple[int, int, int]):
    enc = dict(values["encoder"])
    enc_name = enc.pop("name")
    meth = dict(values["method"])
    meth_name = meth.pop("name")
    try:
        return build_method(meth_name, encoder=enc_name, views=build_views(values["views"]),
                            encoder_kwargs=_encoder_kwargs(enc_name, enc, image_shape),
                            seed=values["seed"], **meth)
    except TypeError as exc:
        raise RecipeError(f"recipe.method: {exc}") from None
    except RecipeError:
        raise
    except ValueError as exc:
        raise RecipeError(f"recipe.method / recipe.encoder: {exc}") from None


# ------------------------------------------------------------------ evaluation

#: every protocol `nearfar eval --protocols` knows
EVAL_PROTOCOLS = ("knn", "linear_probe", "clustering", "rank", "hubness", "geometry",
                  "retrieval")
#: what `nearfar train` and `nearfar eval` run unless told otherwise (the cheap ones;
#: linear_probe only when the recipe's eval.linear_probe is on)
DEFAULT_PROTOCOLS = ("knn", "linear_probe", "clustering", "rank", "hubness", "geometry")
#: protocols that need labels
LABELLED_PROTOCOLS = ("knn", "linear_probe", "clustering", "retrieval")


def check_protocols(protocols: Iterable[str] | str | None) -> tuple[str, ...]:
    """Protocol names, checked (None: :data:`DEFAULT_PROTOCOLS`); a comma-separated string
    is split."""
    if protocols is None:
        return DEFAULT_PROTOCOLS
    if isinstance(protocols, str):
        protocols = [p.strip() for p in protocols.split(",") if p.strip()]
    out = tuple(dict.fromkeys(protocols))
    unknown = [p for p in out if p not in EVAL_PROTOCOLS]
    if unknown or not out:
        raise ValueError(f"protocols: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                         f"known: {', '.join(EVAL_PROTOCOLS)}")
    return out


def _hubness_results(test_emb: Tensor, k: int) -> list[dict]:
    from nearfar.evaluate import Result, hubness

    h = hubness(test_emb, k=k)
    protocol = {**h["protocol"], "n_train": 0, "n_test": int(len(test_emb)),
                "split": "held-out test items among themselves"}
    return [Result(float(h[key]), metric, protocol).to_dict() for key, metric in (
        ("skewness", "k_occurrence_skewness"), ("antihub_share", "antihub_share"),
        ("hub_share", "hub_share"))]


def evaluate_embeddings(train_emb: Tensor, train_labels: Tensor | None, test_emb: Tensor,
                        test_labels: Tensor | None, eval_cfg: dict[str, Any],
                        protocols: Iterable[str] | str | None = None,
                        *, seed: int = 0) -> list[dict]:
    """The protocols on frozen embeddings (all but geometry, which needs views); each
    result carries its protocol. Labelled protocols are skipped without labels.

    Args:
        protocols: names from :data:`EVAL_PROTOCOLS` (None: :data:`DEFAULT_PROTOCOLS`,
            with linear_probe only if ``eval_cfg["linear_probe"]``).
        seed: for k-means.
    """
    default = protocols is None
    protocols = check_protocols(protocols)
    labelled = train_labels is not None and test_labels is not None
    results: list[dict] = []
    if labelled and "knn" in protocols:
        results.append(knn_accuracy(train_emb, train_labels, test_emb, test_labels,
                                    k=min(eval_cfg["knn_k"], len(train_emb)),
                                    temperature=eval_cfg["knn_temperature"]).to_dict())
    if labelled and "linear_probe" in protocols and (eval_cfg["linear_probe"] or not default):
        probe = linear_probe(train_emb, train_labels, test_emb, test_labels,
                             epochs=eval_cfg["probe_epochs"])
        results.append(probe.to_dict() if hasattr(probe, "to_dict") else dict(probe))
    if labelled and "clustering" in protocols and len(torch.unique(test_labels)) >= 2:
        from nearfar.evaluate import clustering_scores
        results += [r.to_dict() for r in clustering_scores(test_emb, test_labels,
                                                           seed=seed).values()]
    if labelled and "retrieval" in protocols:
        from nearfar.evaluate import ndcg_at_k, retrieval_metrics
        kw = {"query_groups": test_labels, "item_groups": train_labels,
              "direction": "test_to_train"}
        found = {**retrieval_metrics(test_emb, train_emb, ks=(1, 10), **kw),
                 **ndcg_at_k(test_emb, train_emb, ks=(10,), **kw)}
        for r in found.values():
            r.protocol.update(relevance="train items of the query's class",
                              queries="held-out items", items="train items",
                              n_train=int(len(train_emb)))
        results += [r.to_dict() for r in found.values()]
    if "rank" in protocols:
        from nearfar.evaluate import rank_metrics
        results += [r.to_dict() for r in rank_metrics(test_emb).values()]
    if "hubness" in protocols and len(test_emb) >= 2:
        results += _hubness_results(test_emb, k=min(10, len(test_emb) - 1))
    return results


def evaluate_geometry(method, images: Tensor, device: torch.device, *, seed: int,
                      max_items: int = 2000) -> list[dict]:
    """Alignment and uniformity (Wang & Isola, 2020) of the frozen encoder on two views
    of up to ``max_items`` held-out images, drawn by the method's own view pipeline from
    a generator seeded with ``seed``. Nothing for methods without views (e.g. CPC)."""
    views = getattr(method, "views", None)
    if views is None or len(images) < 2:
        return []
    from nearfar.evaluate import geometry_metrics

    x_all = images[:max_items]
    g = torch.Generator(device=device).manual_seed(int(seed))
    was_training = method.training
    method.eval()
    z1, z2 = [], []
    try:
        with torch.no_grad():
            for a in range(0, len(x_all), 512):
                x = x_all[a:a + 512].to(device)
                x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
                out = views(x, g)
                v1, v2 = out if isinstance(out, (tuple, list)) else (out, views(x, g))
                z1.append(method.embed(v1).float().cpu())
                z2.append(method.embed(v2).float().cpu())
    finally:
        method.train(was_training)
    found = geometry_metrics(torch.cat(z1), torch.cat(z2), seed=int(seed), views={
        "pipeline": "the method's training views (the card's positive_construction.views)",
        "generator_seed": int(seed), "items": f"the first {len(x_all)} held-out items"})
    return [r.to_dict() for r in found.values()]


def evaluate_image_text(method, test_ds: ImageDataset, test_emb: Tensor) -> list[dict]:
    """For an image-text method on captioned data: image <-> caption retrieval (captions of
    one ``caption_group`` are all relevant) and zero-shot classification with the
    dataset's prompt templates. Nothing for other methods or uncaptioned data."""
    captions = test_ds.meta.get("caption")
    if getattr(method, "modality", None) != "image-text" or captions is None:
        return []
    from nearfar.data.captions import prompt_templates
    from nearfar.evaluate import image_text_retrieval, zero_shot_accuracy

    groups = test_ds.meta.get("caption_group") or list(range(len(captions)))
    # the caption pool is the distinct test captions (template captions repeat, and copies
    # of one wrong caption would otherwise fill the top k)
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    if any(groups[first[c]] != g for c, g in zip(captions, groups)):
        first = {f"{i}": i for i in range(len(captions))}   # one text, several groups: keep all
    texts = [captions[i] for i in first.values()]
    text_emb = method.encode_text(texts)
    found = image_text_retrieval(test_emb, text_emb, image_groups=groups,
                                 text_groups=[groups[i] for i in first.values()])
    for r in found.values():
        r.protocol["texts"] = f"the {len(texts)} distinct captions of the test split"
    results = [r.to_dict() for r in found.values()]
    if test_ds.labels is not None and test_ds.num_classes >= 2:
        results.append(zero_shot_accuracy(test_emb, test_ds.labels, test_ds.classes,
                                          prompt_templates(test_ds.name),
                                          method.encode_text).to_dict())
    return results


def _run_dir_for(values: dict[str, Any]) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{values['name']}-{stamp}"


def train(recipe: Recipe | dict | str | os.PathLike | None = None, *,
          overrides: list[str] | None = None, run_dir: str | os.PathLike | None = None,
          resume: bool = False, progress: bool | None = None) -> RunResult:
    """Train the encoder a recipe describes, evaluate it on the held-out split, write its card.

    Args:
        recipe: a :class:`Recipe`, a dict with recipe keys, a TOML path, or None for the
            packaged default (SimCLR on MNIST-5k).
        overrides: ``["trainer.steps=200", ...]`` applied over the recipe.
        run_dir: where checkpoints, metrics, weights and the card go; defaults to
            ``runs/<name>-<timestamp>``.
        resume: continue the run in ``run_dir`` from its latest checkpoint, exactly.
        progress: show a progress bar (None: the recipe's ``trainer.progress``).

    Launched by ``torchrun`` (several processes), every process trains its slice of
    each global batch under DDP; process 0 alone writes the run directory (it need
    exist on process 0's machine only), evaluates and writes the card, and every
    process returns the same results.
    """
    rec = as_recipe(recipe, overrides)
    many = init_distributed(rec.values["device"])   # torchrun's process group, else nothing
    try:
        result = _train(rec, recipe, overrides, run_dir, resume, progress, many)
    except BaseException:
        shutdown_distributed(wait=False)    # only if joined above
        raise
    shutdown_distributed()
    return result


def _train(rec: Recipe, recipe: Any, overrides: list[str] | None,
           run_dir: str | os.PathLike | None, resume: bool, progress: bool | None,
           many: bool) -> RunResult:
    from nearfar.distributed import rank

    lead = rank() == 0
    values = rec.values
    run_dir = Path(run_dir) if run_dir is not None else _run_dir_for(values)
    if resume and lead:
        saved = run_dir / RECIPE_FILE
        if saved.exists() and recipe is None and not overrides:
            values, _ = _read_recipe(run_dir)
            rec = recipe_from_dict(values)
    # the run directory's timestamp and a resumed recipe are process 0's
    values, run_dir = on_lead((values, run_dir), many)
    resolve_device(values["device"])  # a bad device fails before anything is loaded or written
    seed_everything(values["seed"])
    dataset = load_source(values["data"])
    if getattr(dataset, "modality", "image") == "text-text":   # a dual encoder on text pairs
        from nearfar.api_text import train_text_pairs
        return train_text_pairs(rec, values, dataset, run_dir, resume, progress, many, lead)
    train_ds, test_ds = split_source(dataset, values["data"], values["seed"])
    method = build_method_from_recipe(values, train_ds.image_shape)
    config = train_config(values, progress=progress)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / RECIPE_FILE,
                          {"recipe": values, "input_shape": list(train_ds.image_shape)})
    fit = Trainer(method, train_ds, config, run_dir=run_dir).fit(resume=resume)
    if not lead:    # waits here while process 0 evaluates and writes the card
        results, card = on_lead(None, many)
        return RunResult(run_dir=run_dir, fit=fit.to_dict(), results=results, card=card)

    device = resolve_device(values["device"])
    train_emb = _embed_method(method, train_ds.images, device)
    test_emb = _embed_method(method, test_ds.images, device)
    results = evaluate_embeddings(train_emb, train_ds.labels, test_emb, test_ds.labels,
                                  values["eval"], seed=values["seed"])
    results += evaluate_geometry(method, test_ds.images, device, seed=values["seed"])
    results += evaluate_image_text(method, test_ds, test_emb)
    atomic_write_json(run_dir / EVAL_FILE, {"fit": fit.to_dict(), "results": results})
    card = make_card(run_dir, method, values, dataset, train_ds, test_ds, results, rec.source)
    on_lead((results, card), many)
    return RunResult(run_dir=run_dir, fit=fit.to_dict(), results=results, card=card)


def _embed_method(method, images: Tensor, device: torch.device, batch_size: int = 512) -> Tensor:
    was_training = method.training
    method.eval()
    try:
        return embed_dataset(method.embed, images, batch_size=batch_size, device=device)
    finally:
        method.train(was_training)


# ------------------------------------------------------------------ loading

class Encoder:
    """A trained encoder: ``embed`` maps images to L2-normalised embeddings.

    Attributes:
        method: the trained method (encoder and head) in eval mode.
        card: the run's card (dict), when present.
        run_dir: where it was loaded from.
        embedding_dim: D of :meth:`embed`'s output.
    """

    def __init__(self, method, run_dir: Path, card: dict[str, Any] | None,
                 device: torch.device, image_shape: tuple[int, int, int]) -> None:
        self.method = method.eval()
        self.run_dir = run_dir
        self.card = card
        self.device = device
        self.image_shape = image_shape
        self.embedding_dim = int(method.encoder.out_dim)

    def _as_batch(self, images: Any) -> Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, Tensor):
            raise ValueError(f"images: expected a tensor or numpy array, got "
                             f"{type(images).__name__}")
        rank = len(self.image_shape) + 1     # 4 for images (N, C, H, W), 3 for signals
        if images.ndim == rank - 1:
            images = images.unsqueeze(0)
        if images.ndim != rank or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images: expected shape (N, {', '.join(map(str, self.image_shape))})"
                             f" like the training data, got {tuple(images.shape)}")
        return images

    @torch.no_grad()
    def embed(self, images: Any, *, batch_size: int = 512) -> Tensor:
        """Embed a batch (N, C, H, W) / one image (C, H, W) / an iterable of either.

        uint8 images are scaled to [0, 1]; float images are taken as already in [0, 1].
        Returns (N, D) float32 L2-normalised embeddings on the CPU, computed in
        batches of ``batch_size``.
        """
        if isinstance(images, (Tensor, np.ndarray)):
            parts = [self._as_batch(images)]
        elif isinstance(images, Iterable):
            parts = [self._as_batch(x) for x in images]
            if not parts:
                raise ValueError("images: expected at least one image, got an empty iterable")
        else:
            raise ValueError(f"images: expected a tensor, array or iterable of them, got "
                             f"{type(images).__name__}")
        out = [embed_dataset(self.method.embed, p, batch_size=batch_size, device=self.device)
               for p in parts]
        return F.normalize(torch.cat(out), dim=1)

    __call__ = embed


def _read_recipe(run_dir: Path) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The validated recipe a run was made with, and the (C, H, W) its encoder takes."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    path = run_dir / RECIPE_FILE
    if not path.exists():
        raise RunError(f"{path}: missing; is {run_dir} a directory made by `nearfar train`?")
    try:
        saved = json.loads(path.read_text("utf-8"))
        shape = tuple(int(s) for s in saved["input_shape"])
        return recipe_from_dict(saved["recipe"]).values, shape  # type: ignore[return-value]
    except (json.JSONDecodeError, RecipeError, KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path}: cannot be read ({exc})") from None


def load(run_dir: str | os.PathLike, *, device: str = "auto") -> Encoder:
    """The trained encoder of a run directory (weights checked against their recorded hash)."""
    run_dir = Path(run_dir)
    values, shape = _read_recipe(run_dir)
    if values["method"]["name"] == "dual_encoder":   # text pairs: a TextEncoder
        from nearfar.api_text import load_text_encoder
        return load_text_encoder(run_dir, values, device)
    method = build_method_from_recipe(values, shape)
    load_weights_into(method, run_dir)
    dev = resolve_device(device)
    method.to(dev)
    try:
        card = read_card(run_dir)
    except Exception:  # a run without a card still loads; `nearfar card check` reports it
        card = None
    return Encoder(method, run_dir, card, dev, shape)


def evaluate_run(run_dir: str | os.PathLike, *, data: dict[str, Any] | None = None,
                 device: str = "auto", protocols: Iterable[str] | str | None = None
                 ) -> list[dict[str, Any]]:
    """Re-run the run's evaluation protocols, on its own held-out split or on other data.

    Args:
        data: a [data]-style table (``{"source": "folder", "path": ...}``) to evaluate
            on instead; it is split with the run's test_size and seed.
        protocols: names from :data:`EVAL_PROTOCOLS` (or "knn,rank"); None runs
            :data:`DEFAULT_PROTOCOLS`, as training does, so the numbers reproduce.
    """
    chosen = check_protocols(protocols)
    enc = load(run_dir, device=device)
    values, _ = _read_recipe(Path(run_dir))
    if values["method"]["name"] == "dual_encoder":   # text pairs: held-out retrieval
        from nearfar.api_text import evaluate_text_pairs, split_text_pairs
        data_cfg = {**values["data"], **(data or {})}
        _, test_ds = split_text_pairs(load_source(data_cfg), data_cfg, values["seed"])
        return evaluate_text_pairs(enc.method, test_ds)
    data_cfg = dict(values["data"])
    if data:
        data_cfg.update(data)
    ds = load_source(data_cfg)
    if ds.image_shape != enc.image_shape:
        raise RunError(f"data: images of shape {ds.image_shape} do not fit this encoder "
                       f"(trained on {enc.image_shape}); set data.image_size / grayscale")
    train_ds, test_ds = split_source(ds, data_cfg, values["seed"])
    needs_labels = [p for p in chosen if p in LABELLED_PROTOCOLS]
    if train_ds.labels is None and needs_labels:
        raise RunError(f"data: has no labels; {', '.join(needs_labels)} need labelled data "
                       f"(rank, hubness and geometry do not: --protocols rank,hubness,geometry)")
    train_emb = _embed_method(enc.method, train_ds.images, enc.device)
    test_emb = _embed_method(enc.method, test_ds.images, enc.device)
    results = evaluate_embeddings(train_emb, train_ds.labels, test_emb, test_ds.labels,
                                  values["eval"], None if protocols is None else chosen,
                                  seed=values["seed"])
    if "geometry" in chosen:
        results += evaluate_geometry(enc.method, test_ds.images, enc.device,
                                     seed=values["seed"])
    return results + evaluate_image_text(enc.method, test_ds, test_emb)


def card_markdown(run_dir: str | os.PathLike) -> str:
    return render_markdown(read_card(run_dir))


__all__ = ["DEFAULT_PROTOCOLS", "EVAL_PROTOCOLS", "Encoder", "RunError", "RunResult",
           "evaluate_run", "load", "train"]
