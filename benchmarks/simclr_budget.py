"""Held-out kNN accuracy of the default SimCLR recipe after a fixed wall-clock budget.

Side by side, in one run on the same machine:

* raw pixels: cosine kNN on the flattened images (no training; the bar to clear);
* nearfar: the default recipe (`nearfar train`), its cosine schedule sized so that it
  ends when the budget does (throughput measured in a short calibration first);
* lightly (where installed, the `bench` extra): the same encoder, the same views and
  the same optimizer and schedule, but lightly's ``SimCLRProjectionHead`` and
  ``NTXentLoss`` in a plain fp32 loop, as a lightly user would write it.

No labels are used in training; kNN (k=20, T=0.07, distance-weighted, Wu et al. 2018)
and a linear probe are fit on the 4,000 training images and scored on the 1,000
held-out ones.

    python benchmarks/simclr_budget.py --budget 180
    python benchmarks/simclr_budget.py --budget 60 --impls nearfar --set method.temperature=0.1
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nearfar.api as api  # noqa: E402
from nearfar.data import train_test_split  # noqa: E402
from nearfar.evaluate import knn_accuracy, linear_probe  # noqa: E402
from nearfar.train import Trainer  # noqa: E402


def raw_pixels(train, test) -> dict:
    tr = train.images.flatten(1).float() / 255
    te = test.images.flatten(1).float() / 255
    return {"knn": float(knn_accuracy(tr, train.labels, te, test.labels, k=20,
                                      temperature=0.07)),
            "probe": None, "images_per_s": None, "steps": 0, "train_s": 0.0}


def calibrate(recipe, train, steps: int = 12) -> float:
    """Images/s of the recipe's training step on this machine (a throwaway model)."""
    cfg = api.train_config(recipe.values, progress=False)
    method = api.build_method_from_recipe(recipe.values, train.image_shape)
    trainer = Trainer(method, train, cfg)
    trainer.fit(stop_at_step=3)  # warm-up: allocator, thread pool, autocast caches
    t0 = time.perf_counter()
    trainer.fit(stop_at_step=3 + steps)
    return steps * cfg.batch_size * cfg.accumulate / (time.perf_counter() - t0)


def run_nearfar(budget: float, overrides: list[str], train, test) -> dict:
    recipe = api.as_recipe(None, overrides)
    rate = calibrate(recipe, train)
    batch = recipe["trainer"]["batch_size"] * recipe["trainer"]["accumulate"]
    steps = max(10, int(budget * rate / batch))
    with tempfile.TemporaryDirectory() as tmp:
        run = api.train(recipe, overrides=[f"trainer.steps={steps}",
                                           f"trainer.time_budget_s={budget}",
                                           "trainer.checkpoint_every=0"],
                        run_dir=Path(tmp) / "run", progress=False)
    return {"knn": run.metric("knn_top1"), "probe": run.metric("linear_probe_top1"),
            "images_per_s": run.fit["images_per_s"], "steps": run.fit["step"],
            "train_s": run.fit["train_time_s"], "calibrated_images_per_s": rate}


def run_lightly(budget: float, overrides: list[str], train, test) -> dict | None:
    from _lightly_simclr import lightly_simclr

    from nearfar.train.schedule import WarmupCosine

    v = api.as_recipe(None, overrides).values
    try:
        encoder, opt, step = lightly_simclr(v, train.images)
    except ImportError as exc:
        print(f"lightly not available ({exc}); skipped", file=sys.stderr)
        return None
    t = v["trainer"]
    bs = t["batch_size"]
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(12):
        step()
    rate = 12 * bs / (time.perf_counter() - t0)
    steps = max(10, int(budget * rate / bs))
    sched = WarmupCosine(opt, total_steps=steps, warmup_steps=t["warmup_steps"],
                         min_lr_ratio=t["min_lr_ratio"])
    n = 0
    t0 = time.perf_counter()
    while n < steps and time.perf_counter() - t0 < budget:
        step()
        sched.step()
        n += 1
    train_s = time.perf_counter() - t0
    encoder.eval()
    with torch.no_grad():
        tr = torch.cat([encoder(train.images[i:i + 512].float() / 255)
                        for i in range(0, len(train), 512)])
        te = torch.cat([encoder(test.images[i:i + 512].float() / 255)
                        for i in range(0, len(test), 512)])
    return {"knn": float(knn_accuracy(tr, train.labels, te, test.labels, k=20,
                                      temperature=0.07)),
            "probe": float(linear_probe(tr, train.labels, te, test.labels)["value"]),
            "images_per_s": n * bs / train_s, "steps": n, "train_s": train_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds (default 180)")
    ap.add_argument("--impls", default="raw,nearfar,lightly")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for nearfar and lightly (e.g. method.temperature=0.1)")
    args = ap.parse_args()
    recipe = api.as_recipe(None, args.set)
    ds = api.load_source(recipe["data"])
    train, test = train_test_split(ds, test_size=int(recipe["data"]["test_size"]),
                                   seed=recipe["seed"])
    rows = {}
    for impl in args.impls.split(","):
        fn = {"raw": lambda: raw_pixels(train, test),
              "nearfar": lambda: run_nearfar(args.budget, args.set, train, test),
              "lightly": lambda: run_lightly(args.budget, args.set, train, test)}[impl]
        rows[impl] = fn()
        print(f"{impl}: {rows[impl]}", file=sys.stderr)

    print(f"\nSimCLR, budget {args.budget:.0f} s of training, {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"overrides {args.set or 'none'}\n")
    print("| run | steps | train s | images/s | kNN top-1 | linear probe |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl, r in rows.items():
        if r is None:
            print(f"| {impl} | not installed | | | | |")
            continue
        ips = "" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        probe = "" if r["probe"] is None else f"{r['probe']:.3f}"
        print(f"| {impl} | {r['steps']} | {r['train_s']:.0f} | {ips} | {r['knn']:.3f} | "
              f"{probe} |")
    if rows.get("nearfar") and rows.get("lightly"):
        ratio = rows["nearfar"]["images_per_s"] / rows["lightly"]["images_per_s"]
        print(f"\nnearfar / lightly images/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
