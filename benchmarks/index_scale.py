"""nearfar.index at scale: build time, query latency, recall@10 and deletion time per kind.

    python benchmarks/index_scale.py --n 1000000 --dim 128 --threads 2

Data: synthetic unit vectors with cluster structure (``--clusters`` centres on the
sphere, each point its centre plus Gaussian noise of norm ~``--noise`` relative to it,
then L2-normalised); queries are fresh draws from the same mixture. Pure random
vectors are the worst case for any approximate index and unlike learned embeddings.

What is measured, all through the public :class:`nearfar.index.VectorIndex` API:

- build: ``VectorIndex.create`` (IVF k-means on a sample) + one bulk ``add`` of every
  vector with an id and a ``group`` field, including the item hashes and the atomic,
  fsynced snapshot on disk; the snapshot size;
- query: ``search`` of one query at a time (``k=10``), wall-clock per call (p50 / p99
  over ``--queries`` queries, after 20 warm-up calls); filtered: ``where={"group": "g3"}``
  (10% of items);
- recall@10: overlap of each top-10 with the exact top-10 (a flat inner-product search
  over the same vectors), averaged over the queries; for IVF and HNSW at several
  ``nprobe`` / ``ef_search`` values;
- delete: ``erase`` of one item (the vector and metadata removed, the snapshot
  rewritten without them, the log appended), median of ``--deletes``;
- reopen: ``VectorIndex.open`` with every snapshot file's sha256 verified.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHA = "0" * 64


def make_data(n: int, nq: int, dim: int, clusters: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for s in range(0, m, 100_000):
            e = min(m, s + 100_000)
            x = centres[rng.integers(0, clusters, e - s)]
            x = x + rng.standard_normal((e - s, dim)).astype(np.float32) * (noise / np.sqrt(dim))
            out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(nq)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)[1]


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


def time_queries(index, q: np.ndarray, k: int, where=None, warmup: int = 20):
    for i in range(min(warmup, len(q))):
        index.search(q[i:i + 1] * 0.999 + 0.001, k, encoder_sha256=SHA, where=where)
    lat, found = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        ans = index.search(q[i:i + 1], k, encoder_sha256=SHA, where=where)
        lat.append((time.perf_counter() - t) * 1000)
        found.append([int(h["id"][1:]) for h in ans["results"][0]])
    return lat, found


def recall(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k
                          for f, t in zip(found, truth)]))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def run_kind(kind: str, x, q, truth, truth_g3, args, root: Path) -> list[dict]:
    from nearfar.index import VectorIndex, erase

    path = root / kind
    shutil.rmtree(path, ignore_errors=True)
    n = len(x)
    params = {}
    if kind == "hnsw":
        params = {"M": args.hnsw_m, "ef_construction": args.ef_construction}
    ids = [f"v{i}" for i in range(n)]
    metas = [{"group": f"g{i % 10}"} for i in range(n)]
    t0 = time.perf_counter()
    index = VectorIndex.create(path, dim=x.shape[1], encoder={"weights_sha256": SHA}, kind=kind,
                               params=params, train_vectors=x if kind == "ivf" else None,
                               actor="bench")
    t_create = time.perf_counter() - t0
    index.add(ids, x, metas, encoder_sha256=SHA, actor="bench")
    t_build = time.perf_counter() - t0
    index.search_threads = args.search_threads
    size = folder_bytes(path)
    del ids, metas
    gc.collect()
    print(f"  {kind}: built in {t_build:.1f} s (create/train {t_create:.1f} s), "
          f"{size / 2**20:.0f} MiB on disk", file=sys.stderr, flush=True)

    sweep = {"flat": [None], "ivf": [int(v) for v in args.nprobe.split(",")],
             "hnsw": [int(v) for v in args.ef_search.split(",")]}[kind]
    rows = []
    for value in sweep:
        if kind == "ivf":
            index.set_search_params(nprobe=value)
        elif kind == "hnsw":
            index.set_search_params(ef_search=value)
        lat, found = time_queries(index, q, args.k)
        flat_g3 = None
        if value == sweep[-1] or kind == "flat":
            lat_g3, found_g3 = time_queries(index, q[: max(50, len(q) // 5)], args.k,
                                            where={"group": "g3"})
            flat_g3 = (pct(lat_g3, 50), pct(lat_g3, 99),
                       recall(found_g3, truth_g3[: len(found_g3)], args.k))
        rows.append({"kind": kind, "setting": "-" if value is None else
                     (f"nprobe={value}" if kind == "ivf" else f"ef_search={value}"),
                     "build_s": t_build, "size_mib": size / 2**20,
                     "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                     "recall": recall(found, truth, args.k), "filtered": flat_g3})
        print(f"    {rows[-1]['setting']}: p50 {rows[-1]['p50_ms']:.2f} ms, recall@{args.k} "
              f"{rows[-1]['recall']:.3f}", file=sys.stderr, flush=True)

    times = []
    rng = np.random.default_rng(1)
    for victim in rng.choice(n, args.deletes, replace=False):
        t = time.perf_counter()
        erase(index, [f"v{victim}"], actor="bench")
        times.append(time.perf_counter() - t)
    index.close()
    t = time.perf_counter()
    again = VectorIndex.open(path)
    t_open = time.perf_counter() - t
    assert len(again) == n - args.deletes
    again.close()
    for r in rows:
        r["delete_s"] = statistics.median(times)
        r["open_s"] = t_open
    del index, again
    gc.collect()
    shutil.rmtree(path, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", default="flat,ivf,hnsw")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.75,
                   help="noise norm relative to the unit cluster centre")
    p.add_argument("--nprobe", default="8,16,32,64")
    p.add_argument("--ef-search", default="32,64,128")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--deletes", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="OpenMP threads for building (default: all CPUs)")
    p.add_argument("--search-threads", type=int, default=1,
                   help="OpenMP threads per search call (default 1: one query per call)")
    p.add_argument("--dir", default=None, help="where to write the indexes (default: a tmp dir)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="nearfar-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    x, q = make_data(args.n, args.queries, args.dim, args.clusters, args.noise, args.seed)
    truth = exact_top(x, q, args.k)
    g3 = np.flatnonzero(np.arange(args.n) % 10 == 3)
    truth_g3 = g3[exact_top(x[g3], q, args.k)]
    print(f"data: {args.n:,} x {args.dim} + {args.queries} queries in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

    rows = []
    for kind in args.kinds.split(","):
        rows += run_kind(kind.strip(), x, q, truth, truth_g3, args, root)

    print(f"\n`python benchmarks/index_scale.py --n {args.n} --dim {args.dim} --queries "
          f"{args.queries} --threads {args.threads}` ({platform.machine()}, {os.cpu_count()} "
          f"CPUs, faiss {faiss.__version__}, {args.clusters} clusters, noise {args.noise}; "
          f"one query per call, k={args.k}, {args.search_threads} search thread(s))\n")
    print("| kind | setting | build | on disk | query p50 | query p99 | recall@10 | "
          "filtered p50 / p99 / recall (10% of items) | delete one item | reopen |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        f = r["filtered"]
        filt = "" if f is None else f"{f[0]:.2f} / {f[1]:.2f} ms / {f[2]:.3f}"
        print(f"| {r['kind']} | {r['setting']} | {r['build_s']:.1f} s | {r['size_mib']:.0f} MiB | "
              f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['recall']:.3f} | {filt} | "
              f"{r['delete_s']:.2f} s | {r['open_s']:.1f} s |")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
