"""The HTTP gateway (FastAPI): POST /infer, POST /reconstruct, GET /healthz, /readyz, /v1/models.

Models load once, in a background thread at start-up, so /healthz answers at once and
/readyz turns 200 when the gateway can serve. Every refusal is a 4xx (or 503) with the body
``{"error": {"code": ..., "message": ...}}`` in the format the Accept header asks for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import msgpack
from fastapi import Depends, FastAPI, Request
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi_offline import FastAPIOffline
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comneck.version import __version__
from comneck.backends import MAX_SUPPORT
from comneck.errors import ComneckInputError, ErrorCode

from .errors import ApiError, error_body, status_of
from .metrics import CountRequests, Metrics
from .gateway import Gateway
from .openai_chat import ChatRequest, chunks, completion
from .schemas import ErrorResponse, InferRequest, InferResponse, SupportSetInfo, SupportSetRequest
from .settings import ServerSettings

log = logging.getLogger("comneck.server")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
DOCS_URL, REDOC_URL = "/docs", "/redoc"
MAX_JSON_FIELD_CHARS = 4096  # a multipart JSON field: every option together takes about 120, 26 choices of 150
ModelT = TypeVar("ModelT", bound=BaseModel)
ResultT = TypeVar("ResultT")
MAX_JSON_CONTAINERS = 256  # objects and arrays in a JSON body (an /infer body needs a handful)
MAX_MSGPACK_CONTAINERS = 8  # maps and arrays in a msgpack body; an InferRequest has up to five
MAX_MSGPACK_ITEMS = 64  # entries of one msgpack map or array
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "bad bitstream or request (code says which)"),
        (401, "missing or wrong API key"),
        (408, "the body did not arrive in time (body_timeout)"),
        (409, "bitstream from another codec (codec_mismatch)"),
        (413, "body over the configured limit, or (/reconstruct) an image over the pixel limit"),
        (415, "unsupported content type"),
        (422, "bad prompt, options or size"),
        (503, "not ready yet, busy, or no decode worker (decode_unavailable): retry after the Retry-After seconds"),
    ]
}


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs substituted, to embed in a hand-written requestBody."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/msgpack": {"schema": _inline_schema(InferRequest)},
            "application/json": {"schema": _inline_schema(InferRequest), "description": "bitstreams as base64 strings"},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["bitstream", "prompt"],
                    "properties": {
                        "bitstream": {"type": "string", "format": "binary", "description": "the .cnk file"},
                        "prompt": {"type": "string"},
                        "task": {"type": "string"},
                        "backend": {"type": "string"},
                        "options": {"type": "string", "description": 'JSON object, e.g. {"top_k": 3}'},
                        "choices": {"type": "string", "description": 'JSON array of strings, e.g. ["a cow", "a horse"]'},
                        "support_bitstreams": {"type": "array", "items": {"type": "string", "format": "binary"},
                                               "description": "task fewshot: repeated file parts, one per label"},
                        "support_labels": {"type": "string", "description": 'task fewshot: JSON array, e.g. ["cat", "dog"]'},
                        "support_set": {"type": "string", "description": "task fewshot: a registered support set"},
                    },
                }
            },
        },
    }
}
SUPPORT_SET_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/msgpack": {"schema": _inline_schema(SupportSetRequest)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["support_bitstreams", "support_labels"],
                    "properties": {
                        "support_bitstreams": {"type": "array", "items": {"type": "string", "format": "binary"},
                                               "description": "repeated file parts, one per label"},
                        "support_labels": {"type": "string", "description": 'JSON array, e.g. ["cat", "dog"]'},
                        "backend": {"type": "string"},
                    },
                }
            },
        },
    }
}
CHAT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline_schema(ChatRequest)}}}}
RECONSTRUCT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"bitstream": {"type": "string", "format": "binary"}}}
            },
        },
    }
}


def _framing_refusal(headers: list[tuple[bytes, bytes]], max_bytes: int) -> tuple[ErrorCode, str] | None:
    """Why a request's framing headers are refused before its body is read, or None: Content-Length
    beside Transfer-Encoding, or given twice with different values (each server would frame the body
    its own way), a Content-Length that is not a plain decimal, or one over ``max_bytes``."""
    lengths = {value for name, value in headers if name == b"content-length"}
    if not lengths:
        return None
    if any(name == b"transfer-encoding" for name, _ in headers):
        return ErrorCode.BAD_REQUEST, "Content-Length and Transfer-Encoding together are ambiguous: send one of them"
    if len(lengths) > 1:
        return ErrorCode.BAD_REQUEST, "Content-Length is given twice with different values"
    (declared,) = lengths
    if not declared.isdigit():
        return ErrorCode.BAD_REQUEST, "Content-Length is not a plain decimal number"
    if int(declared) > max_bytes:
        return ErrorCode.BODY_TOO_LARGE, f"request body of {int(declared)} bytes is over this gateway's limit of {max_bytes}"
    return None


class BodyLimit:
    """Guards every request body before the app reads it: ambiguous framing (400) is refused up front,
    a body over ``max_bytes`` (413) as soon as it shows, and a body that is not complete within
    ``timeout_s``, or that after ``grace_s`` averages under ``min_rate`` bytes/s, with 408. A refusal
    sent before the whole body is in closes the connection, so a stalled upload holds it no longer."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, min_rate: int, grace_s: float) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.timeout_s, self.min_rate, self.grace_s = timeout_s, min_rate, grace_s

    def _allowed_s(self, seen: int) -> float:
        """Seconds after the headers by which more than ``seen`` bytes must have come."""
        return min(self.timeout_s, self.grace_s + seen / self.min_rate)

    def _too_slow(self, seen: int) -> str:
        if self._allowed_s(seen) >= self.timeout_s:
            return f"the request body was not complete within {self.timeout_s:g} s"
        return f"the request body came slower than {self.min_rate} bytes/s ({seen} bytes in {self._allowed_s(seen):.1f} s)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = _framing_refusal(scope["headers"], self.max_bytes)
        if refusal is not None:
            code, message = refusal
            await JSONResponse(error_body(code, message), status_of(code), headers={"Connection": "close"})(scope, receive, send)
            return
        start, seen, done, refused = time.monotonic(), 0, False, False

        async def guarded() -> Message:
            nonlocal seen, done, refused
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), start + self._allowed_s(seen) - time.monotonic())
            except asyncio.TimeoutError:
                refused = True
                raise ApiError(ErrorCode.BODY_TIMEOUT, self._too_slow(seen)) from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                refused = True
                raise ApiError(ErrorCode.BODY_TOO_LARGE, f"request body is over this gateway's limit of {self.max_bytes} bytes")
            done = not message.get("more_body", False)
            return message

        async def closing(message: Message) -> None:
            if refused and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, guarded, closing)


class Admission:
    """At most ``limit`` requests past their upload at once (queued for the models or running); the
    rest get 503 ``busy`` at once (a client backs off and retries) instead of piling up."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count, self._lock = limit, 0, threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.count >= self.limit:
                raise ApiError(ErrorCode.BUSY, f"gateway is busy ({self.limit} requests in flight); retry shortly", retry_after=1)
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


class GuardPaths:
    """Runs ``check`` on every request to one of ``paths`` before the app sees it, answering its
    refusal: the routes FastAPI builds itself (the OpenAPI schema, the docs pages) take no
    dependencies, so the API-key check reaches them here."""

    def __init__(self, app: ASGIApp, paths: set[str], check: Callable[[Request], None]) -> None:
        self.app, self.paths, self.check = app, paths, check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            request = Request(scope)
            try:
                self.check(request)
            except ComneckInputError as exc:
                await error_response(request, exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bearer_token(authorization: str) -> str | None:
    """KEY of ``Bearer KEY`` (the scheme in any case), or None for any other form."""
    scheme, _, token = authorization.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _presented_keys(request: Request) -> list[str | None]:
    """Every key a request presents: each Authorization header's bearer token (None where it is no
    ``Bearer KEY``) and each X-API-Key value (an empty one counts, as a wrong key)."""
    return [*map(_bearer_token, request.headers.getlist("authorization")), *request.headers.getlist("x-api-key")]


def wants_msgpack(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(kind in accept for kind in MSGPACK_TYPES)


def respond(request: Request, payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON, or msgpack when the Accept header asks for it."""
    if wants_msgpack(request):
        return Response(msgpack.packb(payload), status, headers, media_type="application/msgpack")
    return JSONResponse(payload, status, headers)


def error_response(request: Request, exc: ComneckInputError) -> Response:
    """A refusal as its coded body and status, with ``Retry-After`` where it has one and
    ``WWW-Authenticate`` for a missing or wrong key."""
    headers = {}
    if isinstance(exc, ApiError) and exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if exc.code == ErrorCode.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return respond(request, error_body(exc.code, str(exc)), status_of(exc.code), headers)


def _one_line(exc: ValidationError | RequestValidationError) -> str:
    """The first validation error as "field.path: message"."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class _Utf8FormParser(MultiPartParser):
    """Starlette's multipart parser with text fields read as strict UTF-8: starlette falls back to
    latin-1, which turns other bytes into a garbled prompt where msgpack refuses them."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            super().on_part_end()
            return
        try:
            self.items.append((part.field_name, part.data.decode("utf-8")))
        except UnicodeDecodeError:
            raise ApiError(ErrorCode.INVALID_REQUEST, f"form field {part.field_name!r} is not UTF-8 text") from None


@asynccontextmanager
async def _form(request: Request, max_fields: int, max_files: int = 1) -> AsyncIterator[FormData]:
    """The multipart body (``max_files`` file parts at most); its spooled files are closed when the block ends."""
    try:
        form = await _Utf8FormParser(request.headers, request.stream(), max_files=max_files, max_fields=max_fields).parse()
    except MultiPartException as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"multipart body cannot be read: {exc.message}") from None
    try:
        yield form
    finally:
        await form.close()


def _unpack(body: bytes) -> Any:
    """A msgpack body, with its text as strict UTF-8 and bounded nesting and size: at most
    ``MAX_MSGPACK_CONTAINERS`` maps or arrays of ``MAX_MSGPACK_ITEMS`` entries each, so a few MiB
    of nested empty arrays cannot become hundreds of MiB of Python objects."""
    built = 0

    def count(container: Any) -> Any:
        nonlocal built
        built += 1
        if built > MAX_MSGPACK_CONTAINERS:
            raise ApiError(ErrorCode.INVALID_REQUEST, f"the msgpack body holds more than {MAX_MSGPACK_CONTAINERS} maps or arrays")
        return container

    try:
        return msgpack.unpackb(
            body, raw=False, object_hook=count, list_hook=count, max_map_len=MAX_MSGPACK_ITEMS, max_array_len=MAX_MSGPACK_ITEMS
        )
    except UnicodeDecodeError:
        raise ApiError(ErrorCode.INVALID_REQUEST, "a text field of the msgpack body is not UTF-8") from None
    except msgpack.StackError:
        raise ApiError(ErrorCode.INVALID_REQUEST, "the msgpack body nests too deep") from None
    except ApiError:  # the container count's refusal, a ValueError too
        raise
    except (ValueError, msgpack.UnpackException) as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"body is not valid msgpack ({type(exc).__name__}: {exc})") from None


def _valid_unicode(value: Any, where: str) -> Any:
    """``value`` (parsed JSON) unchanged, or a refusal if a string in it holds a lone surrogate
    (``"\\ud800"``): JSON's escapes can spell one, UTF-8 cannot carry it, so an answer repeating the
    text back could not be written. Bounded: a body holds at most ``MAX_JSON_CONTAINERS`` containers."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(ErrorCode.INVALID_REQUEST, f"{where} holds a lone surrogate (\\ud800-\\udfff): not Unicode text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_unicode(key, where)
            _valid_unicode(item, f"{where}.{key}" if where != "the body" else f"field {key}")
    elif isinstance(value, list):
        for item in value:
            _valid_unicode(item, where)
    return value


#: Multipart fields sent as JSON text, with an example for the refusal.
_JSON_FIELDS = {"options": '{"top_k": 3}', "choices": '["a cow", "a horse"]', "support_labels": '["cat", "dog"]'}


def _parse_json_field(name: str, text: str) -> Any:
    """A multipart field sent as JSON (:data:`_JSON_FIELDS`), of at most ``MAX_JSON_FIELD_CHARS``
    characters (which also bounds its nesting below Python's recursion limit); its type is
    checked by the request model."""
    if len(text) > MAX_JSON_FIELD_CHARS:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"{name} has {len(text)} characters; at most {MAX_JSON_FIELD_CHARS}")
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ApiError(ErrorCode.INVALID_REQUEST, f"{name} must be JSON, e.g. {_JSON_FIELDS[name]}") from None
    return _valid_unicode(parsed, name)


async def _file_part(form: Any, name: str = "bitstream") -> bytes:
    """The bytes of the multipart file part ``name``."""
    upload = form.get(name)
    if upload is None or isinstance(upload, str):
        raise ApiError(ErrorCode.INVALID_REQUEST, f"multipart body needs the {name} as a file part (curl -F {name}=@photo.cnk)")
    return await upload.read()


async def _file_parts(form: Any, name: str) -> list[bytes] | None:
    """The bytes of every multipart file part ``name`` (repeated parts), None when there is none."""
    uploads = form.getlist(name)
    if not uploads:
        return None
    if any(isinstance(upload, str) for upload in uploads):
        raise ApiError(ErrorCode.INVALID_REQUEST, f"send each of {name} as a file part (curl -F {name}=@photo.cnk)")
    return [await upload.read() for upload in uploads]


def _json_body(body: bytes, binary: tuple[str, ...]) -> Any:
    """A JSON body, its ``binary`` fields (a string, or a list of strings) read as base64; at most
    ``MAX_JSON_CONTAINERS`` objects or arrays (counted by their opening brackets, which bounds the
    Python objects a few MiB could become), strict UTF-8."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_CONTAINERS:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"the JSON body holds more than {MAX_JSON_CONTAINERS} objects or arrays")
    try:
        raw = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(ErrorCode.INVALID_REQUEST, "the JSON body is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"body is not valid JSON ({exc})") from None
    _valid_unicode(raw, "the body")
    if not isinstance(raw, dict):
        return raw
    for name in binary:
        value = raw.get(name)
        try:
            if isinstance(value, str):
                raw[name] = base64.b64decode(value, validate=True)
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                raw[name] = [base64.b64decode(v, validate=True) for v in value]
        except binascii.Error:
            raise ApiError(ErrorCode.INVALID_REQUEST, f"{name} must be base64 in a JSON body") from None
    return raw


async def _read_model(request: Request, model: type[ModelT], files: tuple[str, ...], repeated: tuple[str, ...] = ()) -> ModelT:
    """A msgpack, JSON or multipart body as ``model``: in multipart the ``files`` are file parts, the
    ``repeated`` file parts may come several times (support examples), the JSON fields are text;
    in JSON the bitstreams are base64 strings."""
    kind = _content_type(request)
    required = ", ".join(model.model_json_schema()["required"])
    if kind in MSGPACK_TYPES or kind == "application/json":
        body = await request.body()
        raw = _unpack(body) if kind in MSGPACK_TYPES else _json_body(body, files + repeated)
        if not isinstance(raw, dict):
            raise ApiError(ErrorCode.BAD_REQUEST, f"the body must be a map with {required}")
    elif kind == "multipart/form-data":
        async with _form(request, max_fields=8, max_files=len(files) + MAX_SUPPORT * len(repeated)) as form:
            raw = {**form, **{name: await _file_part(form, name) for name in files}}
            for name in repeated:
                if (parts := await _file_parts(form, name)) is not None:
                    raw[name] = parts
        for name in _JSON_FIELDS:
            if isinstance(raw.get(name), str):
                raw[name] = _parse_json_field(name, raw[name])
    else:
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the request as application/msgpack, application/json or multipart/form-data")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, _one_line(exc)) from None


async def _read_bitstream_body(request: Request) -> bytes:
    kind = _content_type(request)
    if kind == "application/octet-stream":
        return await request.body()
    if kind == "multipart/form-data":
        async with _form(request, max_fields=1) as form:
            return await _file_part(form)
    raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the bitstream as application/octet-stream or multipart/form-data")


def create_app(settings: ServerSettings, gateway: Gateway | None = None) -> FastAPI:
    """The FastAPI app; loads :class:`Gateway` from ``settings`` at start-up unless one is given."""
    state: dict[str, Any] = {"gateway": gateway, "load_error": None}

    def load() -> None:
        start = time.perf_counter()
        log.info("loading preset %s on %s (%s), backends %s", settings.preset, settings.device, settings.dtype, ", ".join(settings.backend_args))
        try:
            state["gateway"] = loaded = Gateway.load(settings)
            metrics.watch(loaded.batcher)
        except Exception as exc:  # the operator reads why in the log and in /readyz
            state["load_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.exception("loading the models failed")
            return
        models = loaded.models
        if models.final_norm_overridden:
            log.warning("CLIP final norm %s by --clip-final-norm, overriding the %s the neck's weights record",
                        models.clip_final_norm, models.recorded_final_norm)
        log.info("ready in %.1f s; CLIP final norm %s; %s", time.perf_counter() - start, models.clip_final_norm, models.note)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if state["gateway"] is None:
            threading.Thread(target=load, name="comneck-load", daemon=True).start()
        yield
        if state["gateway"] is not None and gateway is None:  # what this app loaded, it stops
            state["gateway"].close()

    app = FastAPIOffline(  # /docs and /redoc load Swagger UI and ReDoc from the installed package: they work offline
        docs_url=DOCS_URL,
        redoc_url=REDOC_URL,
        title="ComNeck gateway",
        summary="Compressed image latents in, MLLM answers out: entropy decode -> transform-neck -> CLIP tail -> backend.",
        version=__version__,
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
        min_rate=settings.min_upload_bytes_per_s, grace_s=settings.upload_grace_s,
    )
    admission = Admission(settings.max_queue)
    metrics = Metrics(in_flight=lambda: admission.count)
    if gateway is not None:
        metrics.watch(gateway.batcher)

    def known(key: str | None) -> bool:
        return key is not None and any(secrets.compare_digest(key.encode(), k.encode()) for k in settings.api_keys)

    def check_key(request: Request) -> None:
        """Every key the request presents must be a configured one, and it must present one."""
        if not settings.api_keys:
            return
        presented = _presented_keys(request)
        if not presented or not all(known(key) for key in presented):
            raise ApiError(ErrorCode.UNAUTHORIZED, "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY")

    # Declared so OpenAPI lists both schemes (the Authorize button of /docs); the check reads the headers itself.
    bearer, api_key_header = HTTPBearer(auto_error=False), APIKeyHeader(name="X-API-Key", auto_error=False)

    def authorized(request: Request, _bearer: Any = Depends(bearer), _key: Any = Depends(api_key_header)) -> None:
        check_key(request)

    if not settings.public_docs:  # the index, the schema and the docs pages need a key too (their script files do not)
        docs = {"/", str(app.openapi_url), DOCS_URL, str(app.swagger_ui_oauth2_redirect_url), REDOC_URL}
        app.add_middleware(GuardPaths, paths=docs, check=check_key)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: it counts BodyLimit's and the guard's refusals too

    def ready_gateway() -> Gateway:
        if state["gateway"] is None:
            if state["load_error"]:
                raise ApiError(ErrorCode.LOAD_FAILED, f"models failed to load: {state['load_error']}")
            raise ApiError(ErrorCode.NOT_READY, "models are still loading", retry_after=2)
        return state["gateway"]

    @app.exception_handler(ComneckInputError)
    async def input_error(request: Request, exc: ComneckInputError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return respond(request, error_body(ErrorCode.INVALID_REQUEST, _one_line(exc)), ErrorCode.INVALID_REQUEST.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {400: ErrorCode.BAD_REQUEST, 404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(exc.status_code, ErrorCode.HTTP_ERROR)
        return respond(request, error_body(code, str(exc.detail)), exc.status_code, exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        """An aborted upload is the client's doing: one log line, no traceback (the answer reaches nobody)."""
        log.info("client disconnected before its request body was in: %s %s", request.method, request.url.path)
        return respond(request, error_body(ErrorCode.BAD_REQUEST, "the client disconnected during the upload"), ErrorCode.BAD_REQUEST.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return respond(request, error_body(ErrorCode.INTERNAL_ERROR, "internal error; the server log has the details"), ErrorCode.INTERNAL_ERROR.status)

    @app.get("/", summary="what this is and where its documentation is")
    def root(request: Request) -> Response:
        return respond(request, {"service": "ComNeck gateway", "version": __version__, "docs": "/docs", "redoc": "/redoc",
                                 "openapi": "/openapi.json", "health": "/healthz", "ready": "/readyz", "models": "/v1/models",
                                 "metrics": "/metrics"})

    @app.get("/healthz", summary="liveness: the process answers")
    def healthz(request: Request) -> Response:
        if state["load_error"]:
            return respond(request, error_body(ErrorCode.LOAD_FAILED, state["load_error"]), ErrorCode.LOAD_FAILED.status)
        return respond(request, {"status": "ok"})

    @app.get("/readyz", summary="readiness: models loaded and warmed up", responses={503: {"model": ErrorResponse}})
    def readyz(request: Request) -> Response:
        loaded = ready_gateway()
        if loaded.workers is not None:
            loaded.workers.check()  # 503 decode_unavailable while no decode worker can start
        return respond(request, {"status": "ready", "preset": loaded.models.preset.name, "random_weights": loaded.models.random_weights,
                                 "backends": {name: loaded.pipeline.state(name) for name in loaded.pipeline.specs},
                                 "support_store": loaded.support_sets.state()})

    @app.get("/metrics", summary="Prometheus metrics: requests, stage times, bitstream sizes, admitted requests",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}}, dependencies=[Depends(authorized)])
    def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def admitted(work: Callable[..., ResultT], *args: Any) -> ResultT:
        """``work(*args)`` in an admission slot, on a worker thread (the gateway hands model work to its model thread)."""
        with admission.slot():
            return await run_in_threadpool(work, *args)

    async def run_inference(loaded: Gateway, *args: Any) -> Any:
        """``Gateway.infer`` admitted, its stage times counted."""
        result = await admitted(loaded.infer, *args)
        metrics.observe_answer(result.backend, result.timings_ms, result.num_bytes)
        return result

    @app.get("/v1/models", summary="codec, rate points, networks, backends, random-weight status", dependencies=[Depends(authorized)])
    def models(request: Request, loaded: Gateway = Depends(ready_gateway)) -> Response:
        return respond(request, loaded.model_list())

    @app.post(
        "/infer",
        summary="bitstream + prompt -> answer",
        response_model=InferResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=INFER_BODY,
        dependencies=[Depends(authorized)],
    )
    async def infer(request: Request, loaded: Gateway = Depends(ready_gateway)) -> Response:
        # read before the slot: a slow upload holds no queue place
        req = await _read_model(request, InferRequest, ("bitstream",), ("support_bitstreams",))
        result = await run_inference(loaded, req.bitstream, req.prompt, req.task, req.backend, req.options, req.choices,
                                     req.support_bitstreams, req.support_labels, req.support_set)
        answer = InferResponse(
            text=result.text, backend=result.backend, task=result.task, bytes=result.num_bytes, bpp=result.bpp,
            image_size=result.image_size, rate=result.rate, timings_ms=result.timings_ms,
            random_weights=result.random_weights, note=result.note, details=result.details,
        )
        return respond(request, answer.model_dump(mode="json"))

    @app.post(
        "/v1/chat/completions",
        summary="OpenAI's chat API: one user message with the bitstream as a data:application/x-comneck;base64 image URL",
        responses=ERROR_RESPONSES,
        openapi_extra=CHAT_BODY,
        dependencies=[Depends(authorized)],
    )
    async def chat_completions(request: Request, loaded: Gateway = Depends(ready_gateway)) -> Response:
        req = await _read_model(request, ChatRequest, ())
        data, prompt = req.query()
        result = await run_inference(loaded, data, prompt, req.task, req.model, req.options())
        done = completion(req, result)
        if req.stream:
            return StreamingResponse(chunks(done), media_type="text/event-stream")
        return JSONResponse(done)

    @app.put(
        "/v1/support-sets/{name}",
        summary="register labelled few-shot support bitstreams under a name (described once, reused by requests)",
        response_model=SupportSetInfo,
        responses=ERROR_RESPONSES,
        openapi_extra=SUPPORT_SET_BODY,
        dependencies=[Depends(authorized)],
    )
    async def put_support_set(name: str, request: Request, loaded: Gateway = Depends(ready_gateway)) -> Response:
        req = await _read_model(request, SupportSetRequest, (), ("support_bitstreams",))
        entry = await admitted(loaded.register_support, name, req.support_bitstreams, req.support_labels, req.backend)
        return respond(request, SupportSetInfo(**entry.describe()).model_dump())

    @app.get("/v1/support-sets", summary="the registered support sets", dependencies=[Depends(authorized)])
    def support_sets(request: Request, loaded: Gateway = Depends(ready_gateway)) -> Response:
        return respond(request, {"support_sets": [entry.describe() for entry in loaded.support_sets.all()]})

    @app.delete("/v1/support-sets/{name}", summary="forget a support set", response_model=SupportSetInfo,
                responses=ERROR_RESPONSES, dependencies=[Depends(authorized)])
    def delete_support_set(name: str, request: Request, loaded: Gateway = Depends(ready_gateway)) -> Response:
        return respond(request, SupportSetInfo(**loaded.support_sets.delete(name).describe()).model_dump())

    @app.post(
        "/reconstruct",
        summary="bitstream -> PNG with g_s (for people; /infer never reconstructs)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES},
        openapi_extra=RECONSTRUCT_BODY,
        dependencies=[Depends(authorized)],
    )
    async def reconstruct(request: Request, loaded: Gateway = Depends(ready_gateway)) -> Response:
        data = await _read_bitstream_body(request)
        png = await admitted(loaded.reconstruct, data)
        return Response(png, media_type="image/png")

    return app
