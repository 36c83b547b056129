"""The HTTP service: embed, search, add and erase items, over one index and its encoder.

    POST   /embed            images -> embeddings                              reader
    POST   /search           images or vectors -> k nearest, scores, review    reader
    GET    /card             the encoder's card and what the index holds       reader
    POST   /items            add items (images, or vectors of this encoder)    writer
    DELETE /items/{id}       erase one item (rewrites the saved index)          writer
    DELETE /subjects/{s}     erase every item of a subject                      admin
    GET    /log/verify       check the audit log's hash chain                   admin
    GET    /health           liveness (no key needed)
    GET    /openapi.json, /docs

Keys go in ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. A missing or
wrong key is 401, a role too low 403, a body over the size limit 413, a request that
does not validate 422 (``{"error": "<field>: <what was expected>", "detail": [...]}``),
an encoder version other than the index's 409, an unknown id 404. Every change goes
through the index, which appends it to its audit log with the key id as the actor.
"""

# no `from __future__ import annotations`: FastAPI reads these annotations at run time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from nearfar.index import (
    DuplicateIdError,
    EncoderMismatchError,
    IndexStoreError,
    UnknownIdError,
    VectorIndex,
    erase,
)
from nearfar.index.build import BoundEncoder
from nearfar.serve.keys import RANK, KeyRecord, KeyStore

MAX_BODY_BYTES = 8 << 20
MAX_BATCH = 256
MAX_K = 1000

Scalar = str | int | float | bool | None
Image = list[list[list[float]]]
PixelRange = Literal["0-255", "0-1"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Strict):
    images: list[Image] = Field(min_length=1, description="(N, C, H, W) nested lists")
    pixel_range: PixelRange = Field("0-255", description="0-255: integers (uint8); 0-1: floats")


class SearchRequest(_Strict):
    images: list[Image] | None = Field(None, description="query images (N, C, H, W)")
    vectors: list[list[float]] | None = Field(
        None, description="query embeddings from the index's encoder (give encoder_sha256)")
    encoder_sha256: str | None = Field(None, description="weights sha256 of the encoder "
                                                         "that made `vectors`")
    pixel_range: PixelRange = "0-255"
    k: int = Field(10, ge=1, le=MAX_K)
    where: dict[str, Scalar] = Field(default_factory=dict,
                                     description='equality filter, e.g. {"group": "a"}')

    @model_validator(mode="after")
    def _one_query_kind(self) -> "SearchRequest":
        if (self.images is None) == (self.vectors is None):
            raise ValueError("give either images or vectors (one of them)")
        if self.vectors is not None and not self.encoder_sha256:
            raise ValueError("vectors need encoder_sha256: the weights sha256 of the encoder "
                             "that made them (GET /card shows the index's)")
        return self


class NewItem(_Strict):
    id: str = Field(min_length=1, max_length=512)
    meta: dict[str, Any] = Field(default_factory=dict)
    image: Image | None = None
    vector: list[float] | None = None

    @model_validator(mode="after")
    def _one_content(self) -> "NewItem":
        if (self.image is None) == (self.vector is None):
            raise ValueError("give either image or vector (one of them)")
        return self


class AddRequest(_Strict):
    items: list[NewItem] = Field(min_length=1)
    encoder_sha256: str | None = Field(None, description="required when items carry vectors")
    pixel_range: PixelRange = "0-255"


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 (by Content-Length, or while
    reading a body sent without one)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (f"request body over the limit of {self.max_bytes} bytes; send fewer items "
                   f"per request")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await JSONResponse({"error": message, "detail": message},
                                       status_code=413)(scope, receive, send)
                    return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def create_app(index: VectorIndex, bound: BoundEncoder, keys: KeyStore, *,
               max_body_bytes: int = MAX_BODY_BYTES, max_batch: int = MAX_BATCH) -> FastAPI:
    """The FastAPI app over an index opened for writing and the encoder it is bound to.

    Raises :class:`EncoderMismatchError` when ``bound`` is not the index's encoder.
    """
    index.check_encoder(bound.weights_sha256, f"service's encoder ({bound.run_dir})")
    shape = tuple(int(s) for s in bound.encoder.image_shape)
    sha = bound.weights_sha256
    app = FastAPI(
        title="nearfar retrieval service",
        version="1",
        description="Search an index bound to one encoder version, with review thresholds, "
                    "erasure and an audit log. Send your key as X-API-Key or Bearer.")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.index, app.state.bound, app.state.keys = index, bound, keys

    api_key = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer = HTTPBearer(auto_error=False)

    def principal(role: str):
        def check(key: Annotated[str | None, Security(api_key)],
                  cred: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
                  ) -> KeyRecord:
            token = key or (cred.credentials if cred is not None else None)
            if not token:
                raise HTTPException(401, "missing API key: send X-API-Key: <key> or "
                                         "Authorization: Bearer <key>",
                                    headers={"WWW-Authenticate": "Bearer"})
            record = keys.authenticate(token)
            if record is None:
                raise HTTPException(401, "invalid or revoked API key",
                                    headers={"WWW-Authenticate": "Bearer"})
            if RANK[record.role] < RANK[role]:
                raise HTTPException(403, f"this key's role is {record.role!r}; this request "
                                         f"needs {role!r} or above")
            return record
        return check

    Reader = Annotated[KeyRecord, Depends(principal("reader"))]
    Writer = Annotated[KeyRecord, Depends(principal("writer"))]
    Admin = Annotated[KeyRecord, Depends(principal("admin"))]

    def actor(record: KeyRecord) -> str:
        return f"key:{record.key_id} ({record.name}, {record.role})"

    def images_array(raw: list[Any], pixel_range: str, where: str) -> tuple[Any, np.ndarray | None]:
        if len(raw) > max_batch:
            raise _error(422, f"{where}: at most {max_batch} per request, got {len(raw)}")
        try:
            a = np.asarray(raw, dtype=np.float32)
        except ValueError:
            raise _error(422, f"{where}: expected equal-sized nested lists (N, C, H, W)") from None
        if a.ndim != 4 or tuple(a.shape[1:]) != shape:
            raise _error(422, f"{where}: expected images of shape {shape} (C, H, W) like the "
                              f"encoder's input, got {tuple(a.shape[1:]) if a.ndim == 4 else None}")
        import torch

        if pixel_range == "0-255":
            if a.min() < 0 or a.max() > 255 or not np.all(a == np.round(a)):
                raise _error(422, f"{where}: pixel_range 0-255 expects integers in 0..255")
            u8 = a.astype(np.uint8)
            return torch.from_numpy(u8), u8
        if a.min() < 0 or a.max() > 1:
            raise _error(422, f"{where}: pixel_range 0-1 expects numbers in [0, 1]")
        return torch.from_numpy(a), None

    def check_batch(n: int, where: str) -> None:
        if n > max_batch:
            raise _error(422, f"{where}: at most {max_batch} per request, got {n}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), exclude={"input"})
        return JSONResponse({"error": _validation_message(errors), "detail": errors},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail, "detail": exc.detail},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(IndexStoreError)
    async def _index_error(request: Request, exc: IndexStoreError) -> JSONResponse:
        status = 409 if isinstance(exc, (EncoderMismatchError, DuplicateIdError)) else \
            404 if isinstance(exc, UnknownIdError) else 422
        return JSONResponse({"error": str(exc), "detail": str(exc)}, status_code=status)

    @app.get("/health", summary="liveness; no key needed")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/card", summary="the encoder's card and the index it serves")
    def card(who: Reader) -> dict[str, Any]:
        return {"card": bound.card, "encoder_sha256": sha, "index": index.info()}

    @app.post("/embed", summary="embed images with the index's encoder")
    def embed(body: EmbedRequest, who: Reader) -> dict[str, Any]:
        images, _ = images_array(body.images, body.pixel_range, "images")
        z = bound.embed(images)
        return {"encoder_sha256": sha, "dim": int(z.shape[1]), "embeddings": z.tolist()}

    @app.post("/search", summary="nearest items, with scores and review flags")
    def search(body: SearchRequest, who: Reader) -> dict[str, Any]:
        if body.images is not None:
            images, _ = images_array(body.images, body.pixel_range, "images")
            vectors, version = bound.embed(images), sha
        else:
            check_batch(len(body.vectors), "vectors")
            vectors, version = body.vectors, body.encoder_sha256
        return index.search(vectors, body.k, encoder_sha256=version, where=body.where)

    @app.post("/items", summary="add items (images, or vectors of this encoder)")
    def add_items(body: AddRequest, who: Writer) -> dict[str, Any]:
        check_batch(len(body.items), "items")
        with_images = [i for i, it in enumerate(body.items) if it.image is not None]
        with_vectors = [i for i, it in enumerate(body.items) if it.vector is not None]
        if with_vectors:
            index.check_encoder(body.encoder_sha256, "vectors to add")
        vectors = np.zeros((len(body.items), index.dim), dtype=np.float32)
        contents: list[str | None] = [None] * len(body.items)
        if with_images:
            images, u8 = images_array([body.items[i].image for i in with_images],
                                      body.pixel_range, "items[].image")
            vectors[with_images] = bound.embed(images)
            if u8 is not None:
                for j, i in enumerate(with_images):
                    contents[i] = index.hash_content(u8[j])
        for i in with_vectors:
            v = body.items[i].vector
            if len(v) != index.dim:
                raise _error(422, f"items[{i}].vector: expected {index.dim} numbers, got "
                                  f"{len(v)}")
            vectors[i] = v
        result = index.add([it.id for it in body.items], vectors,
                           [it.meta for it in body.items], encoder_sha256=sha,
                           actor=actor(who), contents=contents)
        return {**result, "ids": [it.id for it in body.items], "encoder_sha256": sha}

    @app.delete("/items/{item_id}", summary="erase one item; reports training-data membership")
    def delete_item(item_id: str, who: Writer) -> dict[str, Any]:
        return erase(index, [item_id], actor=actor(who))

    @app.delete("/subjects/{subject}", summary="erase every item of a subject")
    def delete_subject(subject: str, who: Admin) -> dict[str, Any]:
        return erase(index, subjects=[subject], actor=actor(who))

    @app.get("/log/verify", summary="check the audit log's hash chain")
    def verify(who: Admin, deep: bool = False) -> dict[str, Any]:
        return index.verify(deep=deep)

    return app
