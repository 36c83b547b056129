"""Every packaged recipe for the same wall-clock budget, one table.

For each recipe: measure its training throughput in a short calibration, size the
cosine schedule so it ends with the budget, train (no labels except where the method
is supervised: supcon, supcon_mixed), then report what applies on the held-out split:
kNN top-1 and linear probe on frozen features, zero-shot accuracy and image-to-text
recall@1 / @5 for image-text recipes, query -> document recall@1 and MRR on held-out
groups for text-pair recipes (which keep their own step count, capped by the budget:
their held-out retrieval peaks early).

    python benchmarks/methods.py --budget 60
    python benchmarks/methods.py --budget 30 --recipes default,moco_v2,clip_shapes
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simclr_budget import calibrate  # noqa: E402

import nearfar.api as api  # noqa: E402

COLUMNS = [("knn_top1", "kNN"), ("linear_probe_top1", "probe"),
           ("zero_shot", "zero-shot"), ("image_to_text_recall@1", "i2t R@1"),
           ("image_to_text_recall@5", "i2t R@5"),
           ("query_to_document_recall@1", "q2d R@1"), ("query_to_document_mrr", "q2d MRR")]


def packaged_recipes() -> list[str]:
    files = resources.files("nearfar.recipes").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".toml"))


def metric(results: list[dict], prefix: str) -> float | None:
    for r in results:
        if r["metric"] == prefix or (prefix == "zero_shot" and r["metric"].startswith("zero_shot")):
            return float(r["value"])
    return None


def run(name: str, budget: float) -> dict:
    recipe = api.as_recipe(name)
    ds = api.load_source(recipe["data"])
    if getattr(ds, "modality", "image") == "text-text":
        steps = recipe["trainer"]["steps"]
    else:
        train, _ = api.split_source(ds, recipe["data"], recipe["seed"])
        rate = calibrate(recipe, train, steps=5)
        batch = recipe["trainer"]["batch_size"] * recipe["trainer"]["accumulate"]
        steps = max(10, int(budget * rate / batch))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = api.train(recipe, overrides=[f"trainer.steps={steps}",
                                           f"trainer.time_budget_s={budget}",
                                           "trainer.checkpoint_every=0"],
                        run_dir=Path(tmp) / "run", progress=False)
    return {"method": recipe["method"]["name"], "steps": out.fit["step"],
            "train_s": out.fit["train_time_s"], "wall_s": time.perf_counter() - t0,
            "images_per_s": out.fit["images_per_s"],
            **{key: metric(out.results, key) for key, _ in COLUMNS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=60.0, help="training seconds per recipe")
    ap.add_argument("--recipes", default="", help="comma-separated (default: all packaged)")
    args = ap.parse_args()
    names = args.recipes.split(",") if args.recipes else packaged_recipes()
    rows = {}
    for name in names:
        try:
            rows[name] = run(name, args.budget)
        except Exception as exc:  # one failing recipe must not hide the others' numbers
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: {rows[name]}", file=sys.stderr)

    print(f"\nEvery recipe for {args.budget:.0f} s of training; {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; held-out split "
          f"of each recipe's data; '' = does not apply\n")
    head = " | ".join(label for _, label in COLUMNS)
    print(f"| recipe | method | steps | train s | images/s | {head} |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(COLUMNS))
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:80]} |" + " |" * (3 + len(COLUMNS)))
            continue
        cells = " | ".join("" if r[k] is None else f"{r[k]:.3f}" for k, _ in COLUMNS)
        print(f"| {name} | {r['method']} | {r['steps']} | {r['train_s']:.0f} | "
              f"{r['images_per_s']:.0f} | {cells} |")


if __name__ == "__main__":
    main()
