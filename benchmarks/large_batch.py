"""SimCLR with a logical batch of 8,192 images: peak memory and images/s of plain training,
the tiled loss, and cached gradients (GradCache, Gao et al., 2021) + the tiled loss.

Setup: MNIST-5k (bundled, 28x28, 1 channel), ``SmallCNN()`` with its default widths
(32, 64, 128) and the SimCLR head (512 -> 128), the default MNIST views, NT-Xent at
temperature 0.2, AdamW. 8,192 items per step is more than MNIST-5k holds, so each step
draws 8,192 indices with replacement (a benchmark of cost, not of accuracy). A step is
what ``nearfar.train.Trainer`` does per step: views on the device, one forward over both
views (16,384 embeddings), the loss, backward, optimizer step.

Configurations:

* ``plain``: ``tile=0`` (the full 16,384 x 16,384 score matrix), no chunking;
* ``tiled``: ``tile=None`` (nearfar's exact tiled NT-Xent), no chunking;
* ``cached``: ``grad_cache_chunk=--chunk`` (default 512) + the tiled loss.

Each configuration runs in a fresh Python process with ``--threads`` torch threads (1 by
default): one warm-up step, then ``--steps`` timed steps. Reported: the child's peak RSS
(its own ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the whole process: interpreter,
torch, data and training), the growth of the peak over the RSS just before the first step,
and images/s from the median wall time and the median CPU time of a timed step. A child is
given an address-space limit of its size before the first step plus ``--cap-gib``; when it
runs out, the row reads "over cap".

Usage::

    OMP_NUM_THREADS=1 python benchmarks/large_batch.py                # the table in docs
    python benchmarks/large_batch.py --configs cached --chunk 256 --steps 1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

GIB = 2**30
CONFIGS = ("plain", "tiled", "cached")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(config: str, batch: int, chunk: int, steps: int, threads: int, cap_gib: float,
           seed: int) -> dict:
    import torch

    from nearfar.data import load_mnist5k
    from nearfar.methods import build_method

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images = load_mnist5k().images
    method = build_method("simclr", encoder="small_cnn", temperature=0.2,
                          tile=0 if config == "plain" else None,
                          grad_cache_chunk=chunk if config == "cached" else None)
    method.batch_size = batch
    method.train()
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    data_g = torch.Generator().manual_seed(seed)
    views_g = torch.Generator().manual_seed(seed + 1)

    vm = _rss_kib("VmSize") * 1024
    cap = int(cap_gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (vm + cap, vm + cap))
    base = _rss_kib("VmRSS") * 1024
    walls, cpus, syss, faults, losses = [], [], [], [], []
    try:
        for step in range(steps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            idx = torch.randint(len(images), (batch,), generator=data_g)
            b = {"images": images[idx].float().div_(255), "labels": None, "index": idx}
            optimizer.zero_grad(set_to_none=True)
            out = method.loss(b, generator=views_g)
            out.loss.backward()
            optimizer.step()
            losses.append(float(out.loss.detach()))
            del out, b
            if step > 0:                      # step 0 warms up
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                syss.append(r1.ru_stime - r0.ru_stime)
                faults.append(r1.ru_minflt - r0.ru_minflt)
    except (RuntimeError, MemoryError) as err:
        msg = str(err)
        if isinstance(err, MemoryError) or "memory" in msg.lower() or "alloc" in msg.lower():
            return {"status": "over cap", "detail": msg.splitlines()[0][:200] if msg else ""}
        raise
    peak = _rss_kib("VmHWM") * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"status": "ok", "peak_bytes": maxrss, "wall_s": statistics.median(walls),
            "cpu_s": statistics.median(cpus), "sys_s": statistics.median(syss),
            "page_faults": statistics.median(faults), "walls_s": walls, "base_bytes": base,
            "growth_bytes": peak - base, "losses": losses, "threads": torch.get_num_threads()}


def run_child(config: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--batch", str(args.batch),
           "--chunk", str(args.chunk), "--steps", str(args.steps), "--threads",
           str(args.threads), "--cap-gib", str(args.cap_gib), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        if proc.returncode < 0 or "MemoryError" in proc.stderr or "alloc" in proc.stderr:
            return {"status": "over cap", "detail": " | ".join(tail)}
        raise SystemExit(f"{config}: worker failed:\n" + "\n".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--batch", type=int, default=8192, help="items per step (views: twice)")
    p.add_argument("--chunk", type=int, default=512, help="views per chunk for 'cached'")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cap-gib", type=float, default=14.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.chunk, args.steps, args.threads,
                                args.cap_gib, args.seed)))
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {c!r}; expected some of "
                             f"{', '.join(CONFIGS)}")
    results = {}
    for c in configs:
        results[c] = run_child(c, args)
        print(f"{c}: {results[c]}", file=sys.stderr, flush=True)

    import torch

    print(f"SimCLR, logical batch {args.batch:,} ({2 * args.batch:,} views of 28x28), "
          f"SmallCNN (32, 64, 128), {args.threads} thread(s), median of {args.steps} step(s) "
          f"after 1 warm-up, fresh process each; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}\n")
    print("| configuration | peak RSS | peak growth in the loop | s / step (wall) "
          "| s / step (CPU) | of which system | page faults / step | images/s (CPU) "
          "| loss (first step) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"plain": "plain (full N x N loss)", "tiled": "tiled loss",
             "cached": f"cached gradients (chunk {args.chunk}) + tiled loss"}
    for c in configs:
        r = results[c]
        if r["status"] != "ok":
            print(f"| {names[c]} | over cap ({args.cap_gib:g} GiB) | | | | | | | |")
            continue
        peak = f"{r['peak_bytes'] / GIB:.2f} GiB"
        print(f"| {names[c]} | {peak} | {r['growth_bytes'] / GIB:.2f} GiB | "
              f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['sys_s']:.1f} | "
              f"{r['page_faults'] / 1e6:.2f} M | {args.batch / r['cpu_s']:,.0f} | "
              f"{r['losses'][0]:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
