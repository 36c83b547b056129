"""Peak memory and time of NT-Xent forward + backward, nearfar against its peers.

Every cell runs in a fresh Python process, so one implementation's allocator state
never leaks into another's figure. In that process: import torch and the
implementation, run it once on a tiny batch (lazy initialisation, thread pool),
allocate the inputs z1, z2 of shape (2N/2, D) with requires_grad, record the
resident set size (VmRSS), reset the kernel's high-water mark, run forward +
backward ``repeats`` times, and report

* time: the median wall time of one forward + backward (repeats for small sizes,
  one run for big ones), and
* memory: the peak RSS (VmHWM) minus the RSS just before the first run, i.e. what
  the loss's forward and backward need beyond the inputs.

Each worker gets an address-space limit (RLIMIT_AS: its size after imports plus
the cap) and a wall-clock limit, and cells predicted to exceed the cap are not
started, so the machine is never exhausted; such cells read "over cap", "OOM" or
"timeout" in the table.

Implementations (``--impls``):

* ``auto``: ``nearfar.losses.nt_xent(z1, z2, tile=None)`` (nearfar picks the path)
* ``tiled``: ``nt_xent(..., tile=T)`` with T from ``--tile`` (default: nearfar's)
* ``full``: ``nt_xent(..., tile=0)``, the full similarity matrix
* ``lightly``: ``lightly.loss.NTXentLoss`` (torchvision replaced by a stand-in)
* ``pml``: ``pytorch_metric_learning.losses.NTXentLoss`` on cat(z1, z2) with labels

Usage::

    python benchmarks/loss_memory.py                       # the table in docs/benchmarks.md
    python benchmarks/loss_memory.py --sizes 1024,4096 --impls tiled,full --repeats 3
    python benchmarks/loss_memory.py --check               # peers agree with nearfar?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30
DEFAULT_SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
ALL_IMPLS = ("auto", "tiled", "full", "lightly", "pml")
LABELS = {
    "auto": "nearfar auto (tile=None)",
    "tiled": "nearfar tiled",
    "full": "nearfar full (tile=0)",
    "lightly": "lightly NTXentLoss",
    "pml": "pml NTXentLoss",
}


# ----------------------------------------------------------------------------- workers

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_loss(impl: str, temperature: float, tile: int | None):
    """(callable(z1, z2) -> scalar loss, description) for one implementation."""
    if impl in ("auto", "tiled", "full"):
        from nearfar.losses import nt_xent

        t = {"auto": None, "tiled": tile, "full": 0}[impl]
        if impl == "tiled" and t is None:
            from nearfar.losses.tiled import DEFAULT_TILE_CPU

            t = DEFAULT_TILE_CPU
        return (lambda z1, z2: nt_xent(z1, z2, temperature=temperature, tile=t)), {"tile": t}
    if impl == "lightly":
        import _torchvision_stub

        _torchvision_stub.install()
        from lightly.loss import NTXentLoss

        fn = NTXentLoss(temperature=temperature)
        return (lambda z1, z2: fn(z1, z2)), {}
    if impl == "pml":
        import torch
        from pytorch_metric_learning.losses import NTXentLoss

        fn = NTXentLoss(temperature=temperature)

        def pml(z1, z2):
            labels = torch.arange(len(z1), device=z1.device).repeat(2)
            return fn(torch.cat([z1, z2]), labels)

        return pml, {}
    raise ValueError(f"--impls: unknown implementation {impl!r}; expected one of {ALL_IMPLS}")


def worker(impl: str, views: int, dim: int, repeats: int, temperature: float,
           tile: int | None, cap_bytes: int, threads: int, clock: str) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    fn, extra = make_loss(impl, temperature, tile)
    g = torch.Generator().manual_seed(0)
    small = torch.randn(8, dim, generator=g, requires_grad=True)
    fn(small, small.detach().clone().requires_grad_()).backward()     # warm-up, tiny

    n = views // 2
    z1 = torch.randn(n, dim, generator=g).requires_grad_()
    z2 = torch.randn(n, dim, generator=g).requires_grad_()
    vm = _rss_kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + cap_bytes, vm + cap_bytes))
    base = _rss_kib("VmRSS") * 1024
    peak_exact = _reset_peak()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    loss_value = None
    try:
        for _ in range(repeats):
            z1.grad = z2.grad = None
            t0 = timer()
            loss = fn(z1, z2)
            loss.backward()
            times.append(timer() - t0)
            loss_value = float(loss.detach())
            del loss
    except (RuntimeError, MemoryError) as err:
        msg = str(err)
        if isinstance(err, MemoryError) or "memory" in msg.lower() or "alloc" in msg.lower():
            return {"status": "oom", "detail": msg.splitlines()[0][:200] if msg else "MemoryError"}
        raise
    if peak_exact:
        peak = _rss_kib("VmHWM") * 1024
    else:                             # ru_maxrss also counts any import-time peak
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base_maxrss)
    return {
        "status": "ok",
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_bytes": peak - base,
        "peak_exact": peak_exact,
        "loss": loss_value,
        "threads": torch.get_num_threads(),
        **extra,
    }


# ----------------------------------------------------------------------------- planning

def predicted_bytes(impl: str, views: int, dim: int) -> float:
    """A rough peak estimate, used only to decide whether to start a cell at all."""
    inputs = 4.0 * views * dim * 4          # z, its normalised copy, grads
    if impl in ("auto", "tiled"):
        return inputs + 4.0 * views * 4096 * 4 + 64 * 2**20
    if impl == "full":
        return inputs + 3.2 * views**2 * 4   # logits, softmax, grad (12.4 GiB at 32,768)
    if impl == "lightly":
        return inputs + 4.5 * views**2 * 4   # four blocks, masked copies, cat, softmax
    if impl == "pml":
        # n_per_p and masked negatives are (positive pairs) x (negative pairs) = 2N x 2N(2N-2)
        return inputs + 4.0 * views * views * (views - 2) * 4
    return 0.0


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def installed(impl: str) -> str | None:
    """Version string if the implementation can be imported, else None."""
    from importlib import metadata
    from importlib.util import find_spec

    try:
        if impl in ("auto", "tiled", "full"):
            import nearfar.losses as losses

            return metadata.version("nearfar") if hasattr(losses, "nt_xent") else None
        if impl == "lightly":
            return metadata.version("lightly") if find_spec("lightly") else None
        if impl == "pml":
            return (metadata.version("pytorch-metric-learning")
                    if find_spec("pytorch_metric_learning") else None)
    except (ImportError, metadata.PackageNotFoundError):
        return None
    return None


def run_cell(impl: str, views: int, args) -> dict:
    avail = mem_available()
    cap = int(min(args.max_gib * GIB, max(avail - 2 * GIB, 0)))
    need = predicted_bytes(impl, views, args.dim)
    if need > cap:
        return {"status": "over", "detail": f"predicted {need / GIB:.1f} GiB > cap "
                                            f"{cap / GIB:.1f} GiB"}
    repeats = args.repeats if views < args.big_from else 1
    spec = {"impl": impl, "views": views, "dim": args.dim, "repeats": repeats,
            "temperature": args.temperature, "tile": args.tile, "cap_bytes": cap,
            "threads": args.threads, "clock": args.clock}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "detail": f"> {args.time_limit:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        if proc.returncode < 0:
            return {"status": "killed", "detail": f"signal {-proc.returncode}: {tail}"}
        if "memory" in tail.lower():
            return {"status": "oom", "detail": tail}
        return {"status": "error", "detail": tail}
    out = json.loads(lines[-1])
    out["repeats"] = repeats
    return out


# ----------------------------------------------------------------------------- report

def fmt_time(s: float) -> str:
    if s < 0.1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def fmt_cell(r: dict | None) -> str:
    if r is None:
        return "n/a"
    st = r["status"]
    if st == "ok":
        return f"{fmt_time(r['time_s'])} / {r['peak_bytes'] / GIB:.2f} GiB"
    return {"over": "over cap", "oom": "OOM", "timeout": "timeout", "killed": "killed",
            "absent": "not installed", "error": "error"}[st]


def machine_header(args, argv: list[str], versions: dict) -> list[str]:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    clock = {"wall": "wall time", "cpu": "process CPU time (user + system)"}[args.clock]
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    vers = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    return [
        "```",
        "$ python " + " ".join(["benchmarks/loss_memory.py", *argv]),
        "```",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {mem_total:.0f} GiB RAM, torch "
        f"{torch.__version__} with {torch.get_num_threads()} thread(s), Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}; "
        f"load average at start {load}. Versions: {vers}.",
        "",
        f"NT-Xent, D = {args.dim}, float32, temperature {args.temperature}, CPU, forward + "
        f"backward. Each cell is a fresh process: median {clock} of {args.repeats} runs "
        f"(1 run from 2N = {args.big_from:,}) / peak RSS increase over the process's RSS "
        f"just before the first run (inputs allocated, imports and a tiny warm-up done). "
        f"Memory cap per process {args.max_gib:g} GiB (RLIMIT_AS), time limit "
        f"{args.time_limit:.0f} s.",
        "",
    ]


def table(sizes, impls, results) -> list[str]:
    cols = [LABELS[i] for i in impls]
    ratios = [(a, "full") for a in ("tiled", "auto") if a in impls and "full" in impls]
    head = ["2N views", *cols, *[f"{a} / full time" for a, _ in ratios]]
    align = ["---:", *["---"] * len(cols), *["---:"] * len(ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for v in sizes:
        row = [f"{v:,}"] + [fmt_cell(results.get((i, v))) for i in impls]
        for a, b in ratios:
            ra, rb = results.get((a, v)), results.get((b, v))
            if ra and rb and ra["status"] == rb["status"] == "ok":
                row.append(f"{ra['time_s'] / rb['time_s']:.2f}x")
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def check_agreement(temperature: float, impls) -> list[str]:
    """Loss and gradients of each peer against nearfar's full path, float32 and float64.

    2N = 2,048 (two tiles of nearfar's CPU default), except pml at 2N = 512: its
    memory grows with (2N)^3 (34 GB at 2,048).
    """
    import torch

    def run(impl, z1, z2):
        fn, _ = make_loss(impl, temperature, None)
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        return float(loss.detach()), torch.cat([a.grad, b.grad])

    out = ["Agreement with `nt_xent(tile=0)` on the same inputs, D = 128 (|difference| of "
           "the loss, max |difference| of the input gradients):", ""]
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(1024, 128, generator=g, dtype=torch.float64)
    x2 = torch.randn(1024, 128, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        refs = {}
        for impl in impls:
            if impl == "full":
                continue
            n = 256 if impl == "pml" else 1024
            z1, z2 = x1[:n].to(dtype), x2[:n].to(dtype)
            if n not in refs:
                refs[n] = run("full", z1, z2)
            ref_loss, ref_grad = refs[n]
            loss, grad = run(impl, z1, z2)
            out.append(f"- {LABELS[impl]}, {str(dtype).replace('torch.', '')}, 2N = {2 * n:,}: "
                       f"loss {loss:.7f}, |d loss| {abs(loss - ref_loss):.1e}, "
                       f"max |d grad| {float((grad - ref_grad).abs().max()):.1e}")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        res = worker(**json.loads(argv[1]))
        print(json.dumps(res), flush=True)
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                   help="comma-separated 2N (total views), each even")
    p.add_argument("--impls", default=",".join(ALL_IMPLS),
                   help=f"comma-separated subset of {','.join(ALL_IMPLS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per small cell (median)")
    p.add_argument("--big-from", type=int, default=16384,
                   help="from this 2N on, one timed run per cell")
    p.add_argument("--max-gib", type=float, default=14.0,
                   help="memory cap per worker process, GiB (also bounded by MemAvailable - 2)")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds per cell")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--tile", type=int, default=None,
                   help="tile size for the 'tiled' column (default: nearfar's CPU default)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in each worker (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time as wall clock, or as the worker's CPU time (user + system; "
                        "steadier on a shared machine, meaningful with --threads 1)")
    p.add_argument("--check", action="store_true",
                   help="print how closely the peers agree with nearfar, then the table")
    p.add_argument("--no-table", action="store_true", help="with --check: skip the table")
    args = p.parse_args(argv)

    try:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if any(s < 4 or s % 2 for s in sizes):
        p.error(f"--sizes: expected even numbers >= 4 (2N views), got {sizes}")
    impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in impls if i not in ALL_IMPLS]
    if unknown:
        p.error(f"--impls: unknown {unknown}; expected a subset of {','.join(ALL_IMPLS)}")
    if args.repeats < 1:
        p.error(f"--repeats: expected an integer >= 1, got {args.repeats}")

    versions = {i: installed(i) for i in impls}
    present = [i for i in impls if versions[i]]
    shown = {"nearfar": versions.get("auto") or versions.get("tiled") or versions.get("full"),
             "lightly": versions.get("lightly"), "pytorch-metric-learning": versions.get("pml")}
    lines = machine_header(args, argv, shown)
    for i in impls:
        if not versions[i]:
            print(f"note: {LABELS[i]} is not installed; its column reads 'not installed'",
                  file=sys.stderr)
    if args.check:
        if "full" not in present:
            p.error("--check compares against nearfar's full path, which is not available")
        sys.path.insert(0, str(HERE))
        lines += check_agreement(args.temperature, present)
    print("\n".join(lines), flush=True)
    if args.no_table:
        return 0

    results: dict[tuple[str, int], dict] = {}
    for v in sizes:
        for impl in impls:
            if impl not in present:
                results[(impl, v)] = {"status": "absent"}
                continue
            t0 = time.time()
            r = run_cell(impl, v, args)
            results[(impl, v)] = r
            print(f"  {impl:8s} 2N={v:>7,}: {fmt_cell(r)}  {r.get('detail', '')} "
                  f"[{time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    notes = []
    for impl in impls:
        bad = [(v, results[(impl, v)]) for v in sizes
               if results[(impl, v)]["status"] not in ("ok", "absent")]
        if bad and all(r["status"] == "over" for _, r in bad) and \
                [v for v, _ in bad] == sizes[len(sizes) - len(bad):]:
            v, r = bad[0]
            more = " (and every larger size)" if len(bad) > 1 else ""
            notes.append(f"{LABELS[impl]} at {v:,}{more}: {r['detail']}")
        else:
            notes += [f"{LABELS[impl]} at {v:,}: {r.get('detail', r['status'])}" for v, r in bad]
    out = table(sizes, impls, results)
    if notes:
        out += ["", "Cells not measured or failed:", ""] + [f"- {n}" for n in notes]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
