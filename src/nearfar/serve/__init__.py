"""The retrieval service: an index and its encoder over HTTP (FastAPI + uvicorn).

    nearfar serve keys add --keys keys.json --role admin
    nearfar serve indexes/mnist --run runs/simclr --keys keys.json

See :mod:`nearfar.serve.app` for the endpoints, :mod:`nearfar.serve.keys` for keys.
Needs ``fastapi`` and ``uvicorn`` (``httpx`` for the tests and the load benchmark).
"""

from nearfar.serve.keys import ROLES, KeyFileError, KeyStore

__all__ = ["ROLES", "KeyFileError", "KeyStore"]
