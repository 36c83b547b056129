"""1 against 2 processes (torchrun, gloo on the CPU): throughput and a gradient check.

Scaling. The default recipe's SimCLR (SmallCNN, the MNIST views, fp32) on MNIST-5k
for ``--steps`` steps at ``--batch`` images per process, each process pinned to one
thread, launched by ``python -m torch.distributed.run --standalone`` with 1 and with 2
processes, interleaved ``--repeats`` times. Reported per launch:

* images/s: global images (batch x processes x steps) over the wall time of the
  training loop (``FitResult.train_time_s``; setup, data loading and the final
  checkpoint excluded), median over repeats;
* images per CPU-second: the same images over the CPU time of all processes during
  the loop (``time.process_time``), a figure a busy machine disturbs less: what DDP
  costs on top of the work (the all-reduce, the extra graph walk) shows here.

A third row runs 2 processes with DDP's ``find_unused_parameters`` switched off (the
Trainer switches it on, so that methods that leave a parameter without a gradient on
some steps, such as DINO's frozen prototypes, train under DDP): what that costs.

Gradient check. One optimizer step; the all-reduced gradients of 2 processes with
``b`` images each against the gradients of 1 process on the same ``2b`` images (the
same global order, seeded alike), max |difference| over all parameters, relative to
the largest gradient entry:

* SimCLR, negatives gathered from both processes (``nearfar.distributed``), an encoder
  without BatchNorm and deterministic views (the image and its mirror): DDP should
  reproduce the one-process gradient to float rounding;
* the same with per-process negatives (``method.gather = False``): a different loss,
  so a visibly different gradient (the check can fail);
* SimCLR with BatchNorm in the encoder and head: per-process batch statistics
  (``trainer.sync_batchnorm`` is CUDA-only) make the gradients differ.

    python benchmarks/ddp_scaling.py                    # the table in docs/benchmarks.md
    python benchmarks/ddp_scaling.py --steps 20 --batch 32 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------ inside torchrun

def _simclr(kind: str):
    from torch import nn

    from nearfar.methods import build_method
    from nearfar.train import seed_everything

    seed_everything(0)
    if kind == "scaling":
        from nearfar.views import default_mnist_views

        return build_method("simclr", encoder="small_cnn", views=default_mnist_views(),
                            encoder_kwargs={"in_channels": 1, "widths": (32, 64, 128, 256)},
                            temperature=0.2, hidden_dim=512, out_dim=128)
    if kind == "batchnorm":
        return build_method("simclr", encoder="small_cnn", views=_mirror,
                            encoder_kwargs={"in_channels": 1, "widths": (8, 16)},
                            temperature=0.2, hidden_dim=32, out_dim=16)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32))
    encoder.out_dim = 32
    method = build_method("simclr", encoder=encoder, views=_mirror, temperature=0.2,
                          num_layers=1, out_dim=16)
    if kind == "local":
        method.gather = False
    return method


def _mirror(x, generator=None):
    """Deterministic views (the image and its mirror): no per-process random stream."""
    return x, x.flip(-1)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    from nearfar.data import load_mnist5k
    from nearfar.distributed import rank, world_size
    from nearfar.train import TrainConfig, Trainer
    from nearfar.train.launch import distributed

    if args.no_unused_search:
        import nearfar.train.trainer as trainer_module

        ddp = trainer_module.DistributedDataParallel
        trainer_module.DistributedDataParallel = (   # type: ignore[misc]
            lambda *a, **k: ddp(*a, **{**k, "find_unused_parameters": False}))
    with distributed("cpu"):
        data = load_mnist5k()
        method = _simclr(args.kind)
        steps = args.steps if args.kind == "scaling" else 1
        # scaling: batch per process; gradient check: the same global batch either way
        batch = args.batch if args.kind == "scaling" else args.batch * 2 // world_size()
        cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=1,
                          device="cpu", progress=False, tensorboard=False, threads=1,
                          collapse_std=0.0, checkpoint_every=0)
        trainer = Trainer(method, data, cfg)
        cpu0 = time.process_time()
        fit = trainer.fit()
        cpu = time.process_time() - cpu0
        out = {"images": fit.steps_run * batch * world_size(), "train_s": fit.train_time_s,
               "cpu_s": cpu, "world": world_size()}
        grads = {k: p.grad.detach().clone() for k, p in method.named_parameters()
                 if p.grad is not None}
        from nearfar.distributed import all_gather_no_grad
        cpus = all_gather_no_grad(torch.tensor([cpu], dtype=torch.float64))
        out["cpu_s"] = float(cpus.sum())
        if rank() == 0:
            torch.save({"summary": out, "grads": grads}, args.out)


# ------------------------------------------------------------------ the driver

def launch(nproc: int, kind: str, steps: int, batch: int, out: Path,
           no_unused_search: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(HERE), "--worker", "--kind", kind,
           "--steps", str(steps), "--batch", str(batch), "--out", str(out)]
    if no_unused_search:
        cmd.append("--no-unused-search")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return torch.load(out, weights_only=False)


def gradient_check(tmp: Path, batch: int) -> list[tuple[str, float, float]]:
    rows = []
    labels = {"gathered": "SimCLR, gathered negatives, no BatchNorm",
              "local": "SimCLR, per-process negatives (gather=False)",
              "batchnorm": "SimCLR, BatchNorm (per-process statistics)"}
    for kind, label in labels.items():
        one = launch(1, kind, 1, batch, tmp / f"g1-{kind}.pt")["grads"]
        two = launch(2, kind, 1, batch, tmp / f"g2-{kind}.pt")["grads"]
        assert one.keys() == two.keys(), (kind, sorted(one), sorted(two))
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        scale = max(float(one[k].abs().max()) for k in one)
        rows.append((label, diff, diff / scale))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per scaling run")
    p.add_argument("--batch", type=int, default=64, help="images per process per step")
    p.add_argument("--repeats", type=int, default=3, help="interleaved 1/2-process pairs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="scaling", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--no-unused-search", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        variants = {"1": (1, False), "2": (2, False), "2, no unused search": (2, True)}
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            for name, (nproc, off) in variants.items():
                s = launch(nproc, "scaling", args.steps, args.batch,
                           tmp / f"s{nproc}{off}-{rep}.pt", off)["summary"]
                runs[name].append(s)
                print(f"  repeat {rep + 1}, {name} process(es): "
                      f"{s['images'] / s['train_s']:.0f} images/s, "
                      f"{s['images'] / s['cpu_s']:.0f} images/CPU-s", file=sys.stderr)
        grads = gradient_check(tmp, batch=16)

    print(f"\n{platform.node() or 'this machine'}: {os.cpu_count()} cores, torch "
          f"{torch.__version__}, 1 thread per process, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"\nSimCLR (SmallCNN 32-64-128-256, MNIST views, fp32), {args.steps} steps, "
          f"{args.batch} images per process per step, median of {args.repeats} "
          f"interleaved runs:\n")
    print("| processes | global batch | images/s | images per CPU-s | speed-up "
          "(images/s) | CPU efficiency |")
    print("|---:|---:|---:|---:|---:|---:|")
    med = {}
    for name, r in runs.items():
        med[name] = (statistics.median(x["images"] / x["train_s"] for x in r),
                     statistics.median(x["images"] / x["cpu_s"] for x in r))
    for name, (nproc, _) in variants.items():
        ips, ipc = med[name]
        print(f"| {name} | {args.batch * nproc} | {ips:.0f} | {ipc:.0f} | "
              f"{ips / med['1'][0]:.2f}x | {ipc / med['1'][1]:.2f}x |")
    print("\nGradient check (one step, 2 x 16 images against 1 x 32, the same order):\n")
    print("| method | max abs diff | relative to max grad |")
    print("|---|---:|---:|")
    for label, diff, rel in grads:
        print(f"| {label} | {diff:.2e} | {rel:.2e} |")
    print(json.dumps({"scaling": runs, "grads": grads}), file=sys.stderr)


if __name__ == "__main__":
    main()
