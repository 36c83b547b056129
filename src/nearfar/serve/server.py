"""Run the service: in the foreground (``nearfar serve``) or in a background thread.

    with BackgroundServer(app) as url:          # http://127.0.0.1:<free port>
        httpx.get(f"{url}/health")
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from nearfar.index import VectorIndex, bind_run
from nearfar.serve.app import MAX_BATCH, MAX_BODY_BYTES, create_app
from nearfar.serve.keys import KeyFileError, KeyStore


def open_service(index_dir: str | os.PathLike, run_dir: str | os.PathLike,
                 keys_file: str | os.PathLike, *, device: str = "auto",
                 max_body_bytes: int = MAX_BODY_BYTES, max_batch: int = MAX_BATCH,
                 search_threads: int | None = 1):
    """``(app, index)``: the index opened for writing (locked), bound to the run's encoder.

    Raises EncoderMismatchError when the run is not the index's encoder version, and
    KeyFileError when the keys file is missing or holds no usable key.
    """
    keys = KeyStore(keys_file)
    if not any(not k["revoked"] for k in keys.list()):
        raise KeyFileError(f"{keys_file}: holds no active key; add one with `nearfar serve keys "
                           f"add --keys {keys_file} --role admin`")
    bound = bind_run(run_dir, device=device)
    index = VectorIndex.open(index_dir)
    index.search_threads = search_threads     # requests run in parallel, each single-threaded
    try:
        app = create_app(index, bound, keys, max_body_bytes=max_body_bytes,
                         max_batch=max_batch)
    except BaseException:
        index.close()
        raise
    return app, index


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says TCP; without it every response waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = False,
        announce: Any = print) -> None:
    """Serve ``app`` until interrupted (one process: the index has one writer)."""
    import uvicorn

    sock = bind_socket(host, port)
    actual = sock.getsockname()[1]
    announce(f"http://{host}:{actual}")
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, workers=1)
    uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """uvicorn in a daemon thread on a free loopback port; ``with`` yields the base URL."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def write_port_file(path: str | os.PathLike, url: str) -> None:
    Path(path).write_text(url + "\n", encoding="utf-8")
