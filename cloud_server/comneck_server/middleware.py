"""ASGI middleware that acts before a route reads anything: the request-body guard (framing, size,
upload time and rate) and the path guard that puts the API-key check in front of FastAPI's own pages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comneck.errors import ComneckInputError, ErrorCode

from .errors import ApiError, error_body, status_of
from .transport import error_response


def framing_refusal(headers: list[tuple[bytes, bytes]], max_bytes: int) -> tuple[ErrorCode, str] | None:
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
        refusal = framing_refusal(scope["headers"], self.max_bytes)
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
