"""`nearfar serve INDEX_DIR --run RUN_DIR --keys KEYS_FILE` and `nearfar serve keys ...`.

    nearfar serve keys add --keys keys.json --role reader|writer|admin [--name NAME]
    nearfar serve keys list --keys keys.json
    nearfar serve keys revoke --keys keys.json --key-id ID
    nearfar serve indexes/mnist --run runs/simclr --keys keys.json [--host 127.0.0.1 --port 8000]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_keys(args: argparse.Namespace) -> int:
    from nearfar.serve.keys import KeyStore

    action = args.keys_action
    if not args.keys:
        raise ValueError("serve keys: give --keys KEYS_FILE")
    if action == "add":
        if not args.role:
            raise ValueError("serve keys add: give --role reader|writer|admin")
        token, record = KeyStore(args.keys, create=True).add(args.role, args.name or "")
        print(f"created key {record.key_id} ({record.name}, role {record.role}) in {args.keys}",
              file=sys.stderr)
        print("the key (shown once; only its salted hash is stored):", file=sys.stderr)
        print(token)
        return 0
    if action == "list":
        for k in KeyStore(args.keys).list():
            state = "revoked" if k["revoked"] else "active"
            print(f"{k['key_id']}  {k['role']:<6}  {state:<7}  {k['created']}  {k['name']}")
        return 0
    if action == "revoke":
        if not args.key_id:
            raise ValueError("serve keys revoke: give --key-id ID (see `serve keys list`)")
        record = KeyStore(args.keys).revoke(args.key_id)
        print(f"revoked key {record.key_id} ({record.name})")
        return 0
    raise ValueError(f"serve keys: expected add, list or revoke, got {action!r}")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.index_dir == "keys":
        return cmd_keys(args)
    if args.keys_action:
        raise ValueError(f"serve: unexpected argument {args.keys_action!r}")
    if not args.run or not args.keys:
        raise ValueError("serve: give --run RUN_DIR (the index's encoder) and --keys KEYS_FILE")
    from nearfar.serve.server import open_service, run, write_port_file

    app, index = open_service(args.index_dir, args.run, args.keys, device=args.device,
                              max_body_bytes=int(args.max_body_mb * (1 << 20)),
                              max_batch=args.max_batch,
                              search_threads=args.search_threads or None)

    def announce(url: str) -> None:
        info = index.info()
        print(f"nearfar: serving {args.index_dir} ({info['count']} items, {info['kind']}, "
              f"encoder {info['encoder']['weights_sha256'][:12]}...) on {url} "
              f"(OpenAPI: {url}/docs)", flush=True)
        if args.url_file:
            write_port_file(args.url_file, url)

    try:
        run(app, args.host, args.port, access_log=args.access_log, announce=announce)
    finally:
        index.close()
    return 0


def register(subparsers: Any) -> None:
    """Add `nearfar serve ...` to the top-level subcommands."""
    p = subparsers.add_parser(
        "serve", help="HTTP service over an index: embed, search, add, erase (API keys)",
        description="Serve an index and its encoder over HTTP (FastAPI + uvicorn): POST /embed, "
                    "POST /search, POST /items, DELETE /items/{id}, GET /card, GET /health; "
                    "OpenAPI at /docs. `nearfar serve keys add --keys FILE --role ROLE` makes "
                    "an API key.")
    p.add_argument("index_dir", help="an index directory, or the word `keys`")
    p.add_argument("keys_action", nargs="?", default=None,
                   help="for `serve keys`: add | list | revoke")
    p.add_argument("--run", default=None, help="the run directory of the index's encoder")
    p.add_argument("--keys", default=None, help="the API keys file (JSON, hashed keys)")
    p.add_argument("--role", choices=("reader", "writer", "admin"),
                   help="keys add: reader (embed, search), writer (+ add, delete), admin "
                        "(+ delete by subject, verify log)")
    p.add_argument("--name", default=None, help="keys add: a label for the key")
    p.add_argument("--key-id", default=None, help="keys revoke: the key's id")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--max-body-mb", type=float, default=8.0,
                   help="largest request body in MiB (default 8)")
    p.add_argument("--max-batch", type=int, default=256,
                   help="most images / vectors / items per request (default 256)")
    p.add_argument("--search-threads", type=int, default=1,
                   help="OpenMP threads per search (default 1; requests already run in "
                        "parallel; 0 = FAISS's default)")
    p.add_argument("--device", default="auto", help="device for the encoder (default auto)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn)")
    p.add_argument("--url-file", default=None, help="write the bound URL to this file")
    p.set_defaults(func=cmd_serve)
