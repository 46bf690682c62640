"""The wire formats of the HTTP API, for every router: request bodies in (msgpack, JSON with base64
bitstreams, multipart, raw octet-stream) read into request models with bounded size and nesting,
and answers out as JSON or msgpack, whichever the Accept header asks for."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgpack
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from comneck.backends import MAX_SUPPORT
from comneck.errors import ComneckInputError, ErrorCode

from .errors import ApiError, error_body, status_of

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
MAX_JSON_FIELD_CHARS = 4096  # a multipart JSON field: every option together takes about 120, 26 choices of 150
MAX_JSON_CONTAINERS = 256  # objects and arrays in a JSON body (an /infer body needs a handful)
MAX_MSGPACK_CONTAINERS = 8  # maps and arrays in a msgpack body; an InferRequest has up to five
MAX_MSGPACK_ITEMS = 64  # entries of one msgpack map or array
ModelT = TypeVar("ModelT", bound=BaseModel)


def wants_msgpack(request: Request) -> bool:
    """Whether the Accept header asks for msgpack (the edge client does; browsers and curl get JSON)."""
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


def one_line(exc: ValidationError | RequestValidationError) -> str:
    """The first validation error as "field.path: message", for a one-line refusal."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def _content_type(request: Request) -> str:
    """The media type of the body, lower case, without parameters (charset, boundary)."""
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


async def read_model(request: Request, model: type[ModelT], files: tuple[str, ...], repeated: tuple[str, ...] = ()) -> ModelT:
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
        raise ApiError(ErrorCode.INVALID_REQUEST, one_line(exc)) from None


async def read_bitstream_body(request: Request) -> bytes:
    """A bare bitstream: the whole octet-stream body, or the ``bitstream`` file part of a multipart one."""
    kind = _content_type(request)
    if kind == "application/octet-stream":
        return await request.body()
    if kind == "multipart/form-data":
        async with _form(request, max_fields=1) as form:
            return await _file_part(form)
    raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the bitstream as application/octet-stream or multipart/form-data")
