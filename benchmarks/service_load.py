"""Load on the retrieval service over loopback: concurrent clients, latency, errors.

    python benchmarks/service_load.py --clients 8 --requests 500

Starts ``nearfar serve`` in its own process (uvicorn, one worker) over an index of
MNIST-5k embedded by a run's encoder (``--run``; by default a tiny run is trained
first, ~15 s), then ``--clients`` threads, each with its own keep-alive httpx client,
send ``--requests`` requests each, drawn in a fixed mix:

- 45% ``POST /search`` with one 28x28 image (embedded by the service, k=10),
- 40% ``POST /search`` with one 128-d vector and the encoder version (k=10),
- 10% ``POST /embed`` with one image,
-  5% ``POST /items`` adding one image (writer key; fsynced write-ahead record + log).

Latency is wall-clock per request at the client (send to full response). Every
non-200 answer or transport error counts as an error; the script exits 1 if there is
any. Afterwards the index is reopened: the count must have grown by the acknowledged
adds and the audit log must verify.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SERVER = "import sys; from nearfar.cli import main; sys.exit(main(sys.argv[1:]))"
TINY = ["trainer.steps=3", "trainer.batch_size=32", "trainer.progress=false",
        'trainer.precision="fp32"', "trainer.channels_last=false", "eval.probe_epochs=2",
        "data.test_size=200"]
MIX = (("search image", 45), ("search vector", 40), ("embed", 10), ("add", 5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=500, help="per client")
    p.add_argument("--run", default=None, help="a finished run (default: train a tiny one)")
    p.add_argument("--kind", default="flat", choices=("flat", "ivf", "hnsw"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import httpx

    from nearfar.data import load_mnist5k
    from nearfar.index import VectorIndex, build_index
    from nearfar.serve import KeyStore

    work = Path(tempfile.mkdtemp(prefix="nearfar-load-"))
    try:
        run = Path(args.run) if args.run else work / "run"
        if not args.run:
            import nearfar.api
            t = time.perf_counter()
            nearfar.api.train(None, overrides=TINY, run_dir=run)
            print(f"trained a tiny run in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        index_dir = work / "index"
        index = build_index(run, index_dir, kind=args.kind, actor="bench")
        n0, sha = len(index), index.encoder_sha256
        vectors = index.vectors_of([str(i) for i in range(0, 5000, 10)])
        index.close()
        keys = KeyStore(work / "keys.json", create=True)
        reader, _ = keys.add("reader", "load-reader")
        writer, _ = keys.add("writer", "load-writer")
        images = load_mnist5k().images[:500].numpy()

        url_file = work / "url"
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, "serve", str(index_dir), "--run", str(run),
             "--keys", str(work / "keys.json"), "--port", "0", "--url-file", str(url_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not url_file.exists():
            if server.poll() is not None:
                raise SystemExit(server.stderr.read().decode())
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        url = url_file.read_text().strip()

        kinds = [name for name, weight in MIX for _ in range(weight)]
        results: list[tuple[str, float, bool]] = []
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients)

        def client(worker: int) -> None:
            rng = np.random.default_rng(args.seed + worker)
            mine = []
            with httpx.Client(base_url=url, timeout=60) as c:
                c.get("/health")
                barrier.wait()
                for i in range(args.requests):
                    kind = kinds[rng.integers(len(kinds))]
                    img = images[rng.integers(len(images))][None].tolist()
                    if kind == "search image":
                        req = ("/search", {"images": img, "k": 10}, reader)
                    elif kind == "search vector":
                        v = vectors[rng.integers(len(vectors))]
                        req = ("/search", {"vectors": [v.tolist()], "encoder_sha256": sha,
                                           "k": 10}, reader)
                    elif kind == "embed":
                        req = ("/embed", {"images": img}, reader)
                    else:
                        req = ("/items", {"items": [{"id": f"load-{worker}-{i}",
                                                     "image": img[0],
                                                     "meta": {"worker": worker}}]}, writer)
                    t = time.perf_counter()
                    try:
                        r = c.post(req[0], json=req[1], headers={"X-API-Key": req[2]})
                        ok = r.status_code == 200
                        why = f"{kind}: HTTP {r.status_code} {r.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, why = False, f"{kind}: {type(exc).__name__}: {exc}"
                    mine.append((kind, (time.perf_counter() - t) * 1000, ok))
                    if not ok:
                        with lock:
                            errors.append(why)
            with lock:
                results.extend(mine)

        threads = [threading.Thread(target=client, args=(w,)) for w in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server.terminate()
        server.wait(timeout=30)

        adds = sum(1 for k, _, ok in results if k == "add" and ok)
        again = VectorIndex.open(index_dir)
        check = again.verify()
        grown = len(again) - n0
        again.close()

        print(f"\n`python benchmarks/service_load.py --clients {args.clients} --requests "
              f"{args.requests}` (loopback, server and clients on the same {os.cpu_count()} "
              f"CPUs, {platform.machine()}, {args.kind} index of {n0} MNIST-5k items, "
              f"uvicorn 1 worker; latency at the client)\n")
        print("| request | count | p50 | p99 | errors |")
        print("|---|---:|---:|---:|---:|")
        for name, _ in MIX + (("all", 0),):
            lat = [ms for k, ms, _ in results if name in ("all", k)]
            bad = sum(1 for k, _, ok in results if name in ("all", k) and not ok)
            if lat:
                print(f"| {name} | {len(lat)} | {np.percentile(lat, 50):.1f} ms | "
                      f"{np.percentile(lat, 99):.1f} ms | {bad} |")
        print(f"\n{len(results)} requests in {wall:.1f} s ({len(results) / wall:.0f} requests/s); "
              f"{len(errors)} errors; {adds} adds acknowledged, index grew by {grown}; "
              f"audit log {'intact' if check['ok'] else 'BROKEN'}")
        for e in errors[:10]:
            print(f"  error: {e}")
        failed = bool(errors) or grown != adds or not check["ok"]
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
