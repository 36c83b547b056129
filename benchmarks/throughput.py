"""Training images/s of the default SimCLR recipe beside lightly's head and loss, one table.

Every run is a fresh subprocess with a fixed number of torch threads (1 by default,
``OMP_NUM_THREADS`` too); the runs are interleaved (A B C D A B C D ...) so that a
change in the machine's load hits every row alike, and each row reports the median
images/s over its repeats and the median of its per-round ratios to lightly. What
each row includes:

* ``nearfar``: the default recipe exactly as ``nearfar train`` runs it
  (``Trainer.fit`` on MNIST-5k's 4,000 training images, batch 256): per step, the
  index shuffle, the uint8 batch to float, both views drawn on the batch
  (crop + affine fused into one resampling, jitter, blur, noise), one encoder forward
  over both views, the projection head, NT-Xent, the batch metrics (positive cosine,
  false-negative rate), backward, AdamW, the warmup-cosine schedule, the NaN and
  collapse guards and the metrics record every 10 steps; with the recipe's speed
  settings (precision, ``channels_last``, ``fused_optimizer``). No
  progress bar and no run directory: the file writes of ``metrics.jsonl`` and
  checkpoints are left out of both timings.
* ``nearfar-plain``: the same, with those speed settings off (fp32, contiguous
  tensors, torch's default AdamW), i.e. TrainConfig's own defaults.
* ``lightly``: the same encoder (nearfar's ``small_cnn``, the recipe's widths) and the
  same nearfar views on the same batches, then lightly's ``SimCLRProjectionHead`` and
  ``NTXentLoss`` (temperature from the recipe) in a plain PyTorch loop as a lightly
  user writes it: random batch, views (no grad), ``model(x1)``, ``model(x2)``,
  loss, ``zero_grad``, backward, ``AdamW.step()`` (torch's default AdamW), the same
  warmup-cosine schedule, ``float(loss)``; fp32, contiguous tensors.
* ``lightly-tuned``: the lightly loop with nearfar's kept speed settings applied by
  hand (channels_last, fused AdamW): how much of the difference is the settings
  rather than the library.

Two rates per run: wall-clock images/s, and images per second of the process's CPU
time (``time.process_time``), which other jobs on a shared machine disturb much less
(with one thread the two agree on a quiet machine). Warm-up steps are not
timed; their seconds are reported.

    python benchmarks/throughput.py
    python benchmarks/throughput.py --repeats 5 --steps 30 --threads 1,2
    python benchmarks/throughput.py --impls nearfar,lightly --set trainer.precision="fp32"
    python benchmarks/throughput.py --variant 'fp32:trainer.precision="fp32"'

A ``--variant LABEL:KEY=VALUE[;KEY=VALUE...]`` adds a row: the nearfar default recipe
with those overrides on top. ``--paired`` runs every row in one process instead, a few
steps each in turn (``--steps 2 --repeats 16``): each round's rows then see the same
load, which gives tighter ratios on a busy machine than separate processes do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMPLS = ("nearfar", "nearfar-plain", "lightly", "lightly-tuned")
# the speed settings the plain row turns off (only those TrainConfig knows)
PLAIN = {"precision": "fp32", "channels_last": False, "fused_optimizer": False}


# ------------------------------------------------------------------ workers (one process)

def _recipe(overrides: list[str]):
    import nearfar.api as api

    return api.as_recipe(None, overrides)


def _train_split(recipe):
    import nearfar.api as api

    ds = api.load_source(recipe["data"])
    train, _ = api.split_source(ds, recipe["data"], recipe["seed"])
    return train


def nearfar_runner(overrides: list[str], plain: bool):
    """(run(k) -> last loss, images per step, settings): k steps of the recipe's Trainer."""
    import nearfar.api as api
    from nearfar.train import TrainConfig, Trainer

    known = set(TrainConfig.__dataclass_fields__)
    if plain:
        overrides = overrides + [f"trainer.{k}={json.dumps(v)}" for k, v in PLAIN.items()
                                 if k in known]
    recipe = _recipe(overrides)
    train = _train_split(recipe)
    cfg = api.train_config(recipe.values, progress=False)
    method = api.build_method_from_recipe(recipe.values, train.image_shape)
    trainer = Trainer(method, train, cfg)

    def run(k: int) -> float | None:
        return trainer.fit(stop_at_step=trainer.step + k).final_loss

    settings = {k: getattr(cfg, k) for k in PLAIN if k in known}
    return run, cfg.batch_size * cfg.accumulate, settings


def lightly_runner(overrides: list[str], tuned: bool):
    """(run(k) -> last loss, images per step, settings): k steps of the plain lightly loop;
    ImportError when lightly is not installed."""
    sys.path.insert(0, str(HERE))
    from _lightly_simclr import lightly_simclr

    from nearfar.train.schedule import WarmupCosine

    recipe = _recipe(overrides)
    v = recipe.values
    _, opt, step = lightly_simclr(v, _train_split(recipe).images, channels_last=tuned,
                                  fused=tuned)
    t = v["trainer"]
    sched = WarmupCosine(opt, total_steps=t["steps"], warmup_steps=t["warmup_steps"],
                         min_lr_ratio=t["min_lr_ratio"])

    def run(k: int) -> float:
        loss = math.nan
        for _ in range(k):
            loss = step()
            sched.step()
        return loss

    return run, t["batch_size"], {"precision": "fp32", "channels_last": tuned,
                                  "fused_optimizer": tuned}


def make_runner(impl: str, overrides: list[str], extra: list[str]):
    if impl.startswith("nearfar"):
        return nearfar_runner(overrides + extra, impl == "nearfar-plain")
    return lightly_runner(overrides, impl == "lightly-tuned")


def worker(impl: str, overrides: list[str], extra: list[str], warmup: int, steps: int) -> dict:
    try:
        run, per_step, settings = make_runner(impl, overrides, extra)
    except ImportError as exc:
        return {"error": f"not available ({exc})"}
    t0 = time.perf_counter()
    run(warmup)  # allocator, thread pool, autocast caches
    warm_s = time.perf_counter() - t0
    c0, t0 = time.process_time(), time.perf_counter()
    loss = run(steps)
    cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - t0
    return {"images_per_s": steps * per_step / wall_s,
            "cpu_images_per_s": steps * per_step / cpu_s,
            "warmup_s": warm_s, "loss": loss, "settings": settings}


def paired(impls: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every row in this one process, ``--steps`` steps each in turn, ``--repeats`` rounds:
    each round's rows see the same machine load (CPU time per step; tighter ratios than
    separate processes, at the price of sharing one allocator and cache)."""
    import torch

    torch.set_num_threads(int(args.threads))
    runners = {}
    for impl in impls:
        try:
            runners[impl] = make_runner(impl, args.set, args.variants.get(impl, []))
        except ImportError as exc:
            print(f"{impl}: not available ({exc})", file=sys.stderr)
    warm = {}
    for impl, (run, _, _) in runners.items():
        t0 = time.perf_counter()
        run(args.warmup)
        warm[impl] = time.perf_counter() - t0
    rows: dict[str, list[dict]] = {impl: [] for impl in impls}
    for round_ in range(args.repeats):
        for impl, (run, per_step, settings) in runners.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run(args.steps)
            cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - t0
            rows[impl].append({"images_per_s": args.steps * per_step / wall_s,
                               "cpu_images_per_s": args.steps * per_step / cpu_s,
                               "warmup_s": warm[impl], "settings": settings})
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    for impl in impls:
        if not rows[impl]:
            rows[impl] = [{"error": "not available"}] * args.repeats
    return rows


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = worker(args.worker, args.set, args.extra, args.warmup, args.steps)
    out.update(impl=args.worker, threads=torch.get_num_threads(), torch=torch.__version__)
    print(json.dumps(out))


# ------------------------------------------------------------------------ the driver

def spawn(impl: str, threads: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl,
           "--threads", str(threads), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    for s in args.set:
        cmd += ["--set", s]
    for s in args.variants.get(impl, []):
        cmd += ["--extra", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"impl": impl, "error": f"exit {proc.returncode}: {' / '.join(tail)}"}
    return json.loads(lines[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def describe(settings: dict | None) -> str:
    if not settings:
        return ""
    parts = [settings.get("precision", "fp32")]
    parts.append("channels_last" if settings.get("channels_last") else "contiguous")
    parts.append("fused AdamW" if settings.get("fused_optimizer") else "default AdamW")
    return ", ".join(parts)


def _cell(rows: dict[str, list[dict]], impl: str, key: str) -> tuple[str, str]:
    """(median [min - max], median of the per-round ratios to lightly) of one rate."""
    runs = rows.get(impl, [])
    vals = [r[key] for r in runs if key in r]
    if not vals:
        return "", ""
    base = [r.get(key) for r in rows.get("lightly", [])]
    paired = [r[key] / b for r, b in zip(runs, base) if b and key in r]
    ratio = f"{statistics.median(paired):.2f}x" if paired else ""
    return f"{statistics.median(vals):.0f} ({min(vals):.0f} - {max(vals):.0f})", ratio


def table(results: dict[int, dict[str, list[dict]]], impls: list[str]) -> str:
    out = ["| threads | run | settings | images/s wall (min - max) | vs lightly | "
           "images/s CPU time (min - max) | vs lightly | warm-up s |",
           "|---:|---|---|---:|---:|---:|---:|---:|"]
    for threads, rows in results.items():
        for impl in impls:
            runs = [r for r in rows.get(impl, []) if "images_per_s" in r]
            if not runs:
                err = next((r.get("error") for r in rows.get(impl, []) if "error" in r), "")
                out.append(f"| {threads} | {impl} | failed: {str(err)[:80]} | | | | | |")
                continue
            wall, wall_ratio = _cell(rows, impl, "images_per_s")
            cpu, cpu_ratio = _cell(rows, impl, "cpu_images_per_s")
            warm = statistics.median(r["warmup_s"] for r in runs)
            out.append(f"| {threads} | {impl} | {describe(runs[0].get('settings'))} | {wall} | "
                       f"{wall_ratio} | {cpu} | {cpu_ratio} | {warm:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated of {IMPLS}")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--threads", default="1", help="torch threads, e.g. 1 or 1,2 (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for every row (e.g. trainer.batch_size=128)")
    ap.add_argument("--json", help="also write every run's result to this file")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE;...",
                    help="an extra nearfar row with these recipe overrides")
    ap.add_argument("--paired", action="store_true",
                    help="all rows in this one process, --steps each in turn (CPU time)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        run_worker(args)
        return
    impls = [x for x in args.impls.split(",") if x]
    unknown = [x for x in impls if x not in IMPLS]
    if unknown:
        ap.error(f"--impls: unknown {unknown}; expected some of {', '.join(IMPLS)}")
    args.variants = {}
    for spec in args.variant:
        label, sep, overrides = spec.partition(":")
        if not sep or not label or "=" not in overrides:
            ap.error(f"--variant: expected LABEL:KEY=VALUE[;KEY=VALUE...], got {spec!r}")
        name = f"nearfar+{label}"
        args.variants[name] = [o.strip() for o in overrides.split(";") if o.strip()]
        impls.insert(impls.index("lightly") if "lightly" in impls else len(impls), name)
    thread_counts = [int(x) for x in args.threads.split(",")]
    results: dict[int, dict[str, list[dict]]] = {t: {i: [] for i in impls}
                                                 for t in thread_counts}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for round_ in range(0 if args.paired else args.repeats):
        for threads in thread_counts:
            for impl in impls:
                r = spawn(impl, threads, args)
                results[threads][impl].append(r)
                shown = (f"{r['images_per_s']:.0f} images/s wall, "
                         f"{r['cpu_images_per_s']:.0f} per CPU second") \
                    if "images_per_s" in r else r.get("error")
                print(f"round {round_ + 1}/{args.repeats} threads {threads} {impl}: {shown}",
                      file=sys.stderr, flush=True)
    if args.paired:
        args.threads = str(thread_counts[0])
        results = {thread_counts[0]: paired(impls, args)}
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import torch

    how = ("one process, the rows in turn" if args.paired
           else "a fresh process per run")
    print(f"\n`{' '.join(['python', 'benchmarks/throughput.py'] + sys.argv[1:])}`; {started}; "
          f"{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; the recipe's "
          f"batch; {args.warmup} warm-up + {args.steps} timed steps per run, {how}, "
          f"{args.repeats} interleaved rounds; load average {load_before:.1f} before, "
          f"{load_after:.1f} after; overrides {args.set or 'none'}\n")
    print(table(results, impls))
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started, "args": vars(args),
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
