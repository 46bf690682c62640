"""The HTTP gateway (FastAPI): the app, its start-up, middleware, refusals and routers.

Models load once, in a background thread at start-up, so /healthz answers at once and
/readyz turns 200 when the gateway can serve. Every refusal is a 4xx (or 503) with the body
``{"error": {"code": ..., "message": ...}}`` in the format the Accept header asks for. The routes
live in :mod:`comneck_server.routers`, by concern; body formats in :mod:`comneck_server.transport`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from comneck.errors import ComneckInputError, ErrorCode
from comneck.version import __version__

from .context import AppContext
from .errors import error_body
from .gateway import Gateway
from .metrics import CountRequests
from .middleware import BodyLimit, GuardPaths
from .routers import inference, openai, operations, support
from .settings import ServerSettings
from .transport import error_response, one_line, respond

log = logging.getLogger("comneck.server")
DOCS_URL, REDOC_URL = "/docs", "/redoc"


def _load(ctx: AppContext) -> None:
    """Loads the gateway into ``ctx`` (the start-up thread), or records why it failed for /healthz and /readyz."""
    settings, start = ctx.settings, time.perf_counter()
    log.info("loading preset %s on %s (%s), backends %s", settings.preset, settings.device, settings.dtype, ", ".join(settings.backend_args))
    try:
        ctx.gateway = loaded = Gateway.load(settings)
        ctx.metrics.watch(loaded.batcher)
    except Exception as exc:  # the operator reads why in the log and in /readyz
        ctx.load_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.exception("loading the models failed")
        return
    models = loaded.models
    if models.final_norm_overridden:
        log.warning("CLIP final norm %s by --clip-final-norm, overriding the %s the neck's weights record",
                    models.clip_final_norm, models.recorded_final_norm)
    log.info("ready in %.1f s; CLIP final norm %s; %s", time.perf_counter() - start, models.clip_final_norm, models.note)


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as a coded error body: the gateway's refusals, FastAPI's and Starlette's, a
    client gone mid-upload, and (500, details only in the log) anything unexpected."""

    @app.exception_handler(ComneckInputError)
    async def input_error(request: Request, exc: ComneckInputError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return respond(request, error_body(ErrorCode.INVALID_REQUEST, one_line(exc)), ErrorCode.INVALID_REQUEST.status)

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


def create_app(settings: ServerSettings, gateway: Gateway | None = None) -> FastAPI:
    """The FastAPI app; loads :class:`Gateway` from ``settings`` at start-up unless one is given."""
    ctx = AppContext(settings, gateway)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if ctx.gateway is None:
            threading.Thread(target=_load, args=(ctx,), name="comneck-load", daemon=True).start()
        yield
        if ctx.gateway is not None and gateway is None:  # what this app loaded, it stops
            ctx.gateway.close()

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
    if not settings.public_docs:  # the index, the schema and the docs pages need a key too (their script files do not)
        docs = {"/", str(app.openapi_url), DOCS_URL, str(app.swagger_ui_oauth2_redirect_url), REDOC_URL}
        app.add_middleware(GuardPaths, paths=docs, check=ctx.check_key)
    app.add_middleware(CountRequests, metrics=ctx.metrics)  # outermost: it counts BodyLimit's and the guard's refusals too
    _add_error_handlers(app)
    for routes in (operations, inference, openai, support):
        app.include_router(routes.router(ctx))
    return app
