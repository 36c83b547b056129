"""`nearfar index build | query | delete | verify-log | info`.

    nearfar index build RUN_DIR --out INDEX_DIR [--data mnist5k|FOLDER|MANIFEST] [--kind flat]
    nearfar index query INDEX_DIR --run RUN_DIR --image a.png [-k 10] [--where 'group == "a"']
    nearfar index query INDEX_DIR --like ITEM_ID
    nearfar index delete INDEX_DIR --id ITEM_ID [--id ...] | --subject SUBJECT
    nearfar index verify-log INDEX_DIR [--deep]
    nearfar index info INDEX_DIR
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import Any


def default_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # pragma: no cover - no user name in some containers
        return "cli:unknown"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def cmd_build(args: argparse.Namespace) -> int:
    from nearfar.index import build_index

    params = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe),
                                ("M", args.hnsw_m), ("ef_construction", args.ef_construction),
                                ("ef_search", args.ef_search)) if v is not None}
    index = build_index(args.run_dir, args.out, data=args.data, kind=args.kind, params=params,
                        threshold=args.threshold, subject_field=args.subject_field,
                        actor=args.actor, device=args.device)
    info = index.info()
    index.close()
    if args.json:
        _print_json(info)
        return 0
    print(f"indexed {info['count']} items ({info['kind']}, dim {info['dim']}) into {args.out}")
    print(f"  encoder: {info['encoder']['weights_sha256']}")
    print(f"  threshold: {info['threshold']['value']:g} ({info['threshold']['source']})")
    print(f"  training record: {info['training_record']['status']}: "
          f"{info['training_record']['basis']}")
    print(f"  index hash: {info['index_hash']}")
    return 0


def _query_images(paths: list[str], bound) -> Any:
    from nearfar.data.images import read_images

    c, h, w = bound.encoder.image_shape
    images, kept = read_images([Path(p) for p in paths], image_size=(h, w), grayscale=c == 1,
                               strict=True)
    return images


def cmd_query(args: argparse.Namespace) -> int:
    from nearfar.index import VectorIndex, bind_run, parse_where

    where = parse_where(args.where)
    if bool(args.image) == bool(args.like):
        raise ValueError("index query: give query images (--image, with --run) or indexed "
                         "items to query by (--like ID), one or the other")
    index = VectorIndex.open(args.index_dir, writable=False)
    if args.image:
        if not args.run:
            raise ValueError("index query --image: also give --run RUN_DIR, the encoder that "
                             "embeds the images (it must be the index's encoder version)")
        bound = bind_run(args.run, device=args.device)
        index.check_encoder(bound.weights_sha256, f"query encoder ({args.run})")
        vectors = bound.embed(_query_images(args.image, bound))
        sha, labels = bound.weights_sha256, list(args.image)
    else:
        if args.run:
            from nearfar.index import weights_sha256
            index.check_encoder(weights_sha256(args.run), f"query encoder ({args.run})")
        vectors, sha, labels = index.vectors_of(args.like), index.encoder_sha256, args.like
    answer = index.search(vectors, args.k, encoder_sha256=sha, where=where)
    if args.json:
        _print_json(answer)
        return 0
    print(f"encoder {answer['encoder_sha256'][:12]}...  threshold {answer['threshold']:g} "
          f"({answer['threshold_source']})" + (f"  where {where}" if where else ""))
    for label, rows in zip(labels, answer["results"]):
        print(f"query {label}:")
        if not rows:
            print("  (no match)")
        for rank, r in enumerate(rows, 1):
            flag = "  needs review" if r["needs_review"] else ""
            print(f"  {rank:>3}. {r['id']:<20} {r['score']:.4f}{flag}  {json.dumps(r['meta'])}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from nearfar.index import VectorIndex, erase

    if not args.id and not args.subject:
        raise ValueError("index delete: give --id ITEM_ID and/or --subject SUBJECT")
    with VectorIndex.open(args.index_dir) as index:
        report = erase(index, args.id, subjects=args.subject, actor=args.actor)
    if args.json:
        _print_json(report)
        return 0
    print(f"deleted {len(report['deleted'])} item(s); index rewritten (log entry "
          f"{report['log_seq']}, {report['cache_entries_dropped']} cached results dropped)")
    if report["not_found"]:
        print(f"  not found: {', '.join(report['not_found'])}")
    for s, n in report["subjects"].items():
        print(f"  subject {s}: {n} item(s)")
    for row in report["training_data"]:
        print(f"  {row['id']}: in the encoder's training data: {row['in_training_data']} "
              f"({row['basis']})")
    for s, row in report.get("subject_training_data", {}).items():
        print(f"  subject {s}: in the encoder's training data: {row['in_training_data']} "
              f"({row['basis']})")
    print(f"  {report['note']}")
    return 0


def cmd_verify_log(args: argparse.Namespace) -> int:
    from nearfar.index import IndexCorruptError, VectorIndex, verify_log

    try:
        index = VectorIndex.open(args.index_dir, writable=False)
    except IndexCorruptError as exc:
        report = verify_log(Path(args.index_dir) / "audit.jsonl").to_dict()
        result = {"ok": False, "log": report, "problems": [str(exc)] + report["problems"]}
    else:
        result = index.verify(deep=args.deep)
    if args.json:
        _print_json(result)
    elif result["ok"]:
        log = result["log"]
        print(f"{args.index_dir}: audit log intact ({log['entries']} entries, head "
              f"{log['head_hash'][:16]}...)" + ("; every item matches its hash" if args.deep
                                                 else ""))
    else:
        print(f"{args.index_dir}: audit log check FAILED:")
        for p in result["problems"]:
            print(f"  - {p}")
    return 0 if result["ok"] else 1


def cmd_info(args: argparse.Namespace) -> int:
    from nearfar.index import VectorIndex

    info = VectorIndex.open(args.index_dir, writable=False).info()
    if args.json:
        _print_json(info)
        return 0
    for key in ("path", "kind", "count", "dim", "index_hash", "generation", "wal_records",
                "created"):
        print(f"{key:>16}: {info[key]}")
    print(f"{'params':>16}: {json.dumps(info['params'])}")
    print(f"{'encoder':>16}: {info['encoder']['weights_sha256']} "
          f"({info['encoder'].get('architecture')}, run {info['encoder'].get('run_dir')})")
    print(f"{'threshold':>16}: {info['threshold']['value']:g} ({info['threshold']['source']})")
    print(f"{'log':>16}: {info['log']['head_seq']} entries, head {info['log']['head_hash']}")
    print(f"{'training record':>16}: {info['training_record']['status']}: "
          f"{info['training_record']['basis']}")
    return 0


def cmd_help(parser: argparse.ArgumentParser):
    def run(args: argparse.Namespace) -> int:
        parser.print_help()
        return 0
    return run


def register(subparsers: Any) -> None:
    """Add `nearfar index ...` to the top-level subcommands."""
    p = subparsers.add_parser(
        "index", help="vector index bound to an encoder version: build, query, delete, audit",
        description="A FAISS index of a run's embeddings, bound to its weights sha256, with "
                    "metadata filters, review thresholds, erasure and a hash-chained audit log.")
    p.set_defaults(func=cmd_help(p))
    sub = p.add_subparsers(dest="index_command", metavar="ACTION")

    def json_flag(q: argparse.ArgumentParser) -> None:
        q.add_argument("--json", action="store_true", help="print JSON")

    b = sub.add_parser("build", help="embed a dataset with a run's encoder into a new index")
    b.add_argument("run_dir", help="a finished run directory (weights, recipe.json, card.json)")
    b.add_argument("--out", required=True, help="the new index directory")
    b.add_argument("--data", default=None,
                   help="what to index: a bundled dataset (mnist5k, digits), an image folder or "
                        "a .csv/.jsonl manifest (default: the run's own data)")
    b.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                   help="flat: exact (default); ivf / hnsw: approximate, for size")
    b.add_argument("--threshold", type=float, default=None,
                   help="review threshold (default: the audit's T* when the run has one, "
                        "else 0.5)")
    b.add_argument("--subject-field", default="subject",
                   help="metadata column `delete --subject` matches (default subject)")
    b.add_argument("--nlist", type=int, help="ivf: number of lists")
    b.add_argument("--nprobe", type=int, help="ivf: lists searched per query")
    b.add_argument("--hnsw-m", type=int, help="hnsw: links per node (M)")
    b.add_argument("--ef-construction", type=int, help="hnsw: efConstruction")
    b.add_argument("--ef-search", type=int, help="hnsw: efSearch")
    b.add_argument("--actor", default=default_actor(), help="who, for the audit log")
    b.add_argument("--device", default="auto", help="device for embedding (default auto)")
    json_flag(b)
    b.set_defaults(func=cmd_build)

    q = sub.add_parser("query", help="nearest items to query images or to indexed items")
    q.add_argument("index_dir")
    q.add_argument("--run", default=None, help="run directory of the index's encoder")
    q.add_argument("--image", action="append", default=[], help="query image file (repeatable)")
    q.add_argument("--like", action="append", default=[],
                   help="query with the stored vector of this indexed id (repeatable)")
    q.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    q.add_argument("--where", action="append", default=[], metavar="'FIELD == VALUE'",
                   help="metadata equality filter, e.g. 'group == \"a\"' (repeatable: AND)")
    q.add_argument("--device", default="auto")
    json_flag(q)
    q.set_defaults(func=cmd_query)

    d = sub.add_parser("delete", help="erase items by id or subject (rewrites the saved index)")
    d.add_argument("index_dir")
    d.add_argument("--id", action="append", default=[], help="item id (repeatable)")
    d.add_argument("--subject", action="append", default=[],
                   help="every item whose subject field equals this (repeatable)")
    d.add_argument("--actor", default=default_actor(), help="who, for the audit log")
    json_flag(d)
    d.set_defaults(func=cmd_delete)

    v = sub.add_parser("verify-log", help="check the audit log's hash chain (exit 1 if broken)")
    v.add_argument("index_dir")
    v.add_argument("--deep", action="store_true",
                   help="also recompute every item's hash from its stored vector")
    json_flag(v)
    v.set_defaults(func=cmd_verify_log)

    i = sub.add_parser("info", help="what an index holds and what it is bound to")
    i.add_argument("index_dir")
    json_flag(i)
    i.set_defaults(func=cmd_info)
