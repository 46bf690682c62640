"""What the routers of one app share: its settings, the gateway once loaded (or why it failed),
admission, metrics and the API-key check, and the steps every model-bound route takes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from comneck.errors import ErrorCode
from comneck.pipeline import Answer

from .auth import key_check, key_dependency
from .errors import ApiError
from .gateway import Gateway
from .metrics import Metrics
from .settings import ServerSettings

ResultT = TypeVar("ResultT")
#: How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_S = 0.05


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


class AppContext:
    """One app's shared state, built by ``create_app`` and handed to each router; the start-up
    thread sets ``gateway`` (or ``load_error``) once the models are in."""

    def __init__(self, settings: ServerSettings, gateway: Gateway | None) -> None:
        self.settings, self.gateway, self.load_error = settings, gateway, None
        self.admission = Admission(settings.max_queue)
        self.metrics = Metrics(in_flight=lambda: self.admission.count)
        if gateway is not None:
            self.metrics.watch(gateway.batcher)
        self.check_key: Callable[[Request], None] = key_check(settings.api_keys)
        self.authorized = key_dependency(self.check_key)  # Depends(ctx.authorized) on every route that needs a key

    def keyed_router(self) -> APIRouter:
        """A router whose every route needs a key (when keys are configured)."""
        return APIRouter(dependencies=[Depends(self.authorized)])

    def ready_gateway(self) -> Gateway:
        """The loaded gateway (a route dependency), or 503 while it loads, or the reason loading failed."""
        if self.gateway is None:
            if self.load_error:
                raise ApiError(ErrorCode.LOAD_FAILED, f"models failed to load: {self.load_error}")
            raise ApiError(ErrorCode.NOT_READY, "models are still loading", retry_after=2)
        return self.gateway

    async def admitted(self, work: Callable[..., ResultT], *args: Any) -> ResultT:
        """``work(*args)`` in an admission slot, on a worker thread (the gateway hands model work to its model thread)."""
        with self.admission.slot():
            return await run_in_threadpool(work, *args)

    async def run_inference(self, request: Request, loaded: Gateway, *args: Any) -> Answer:
        """``Gateway.admit`` in an admission slot on a worker thread (checks and decoding), then the
        wait for its batch on the event loop: a client that goes away while its request waits drops
        it (never computed), and the deadline answers ``deadline_exceeded``; stage times counted."""
        with self.admission.slot():
            ticket = await run_in_threadpool(loaded.admit, *args)
            waiting = asyncio.wrap_future(ticket.future)
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if ticket.deadline is not None and time.perf_counter() >= ticket.deadline:
                    break  # ticket.answer answers deadline_exceeded
                if not waiting.done() and await request.is_disconnected():
                    ticket.cancel()
                    raise ClientDisconnect()
            result = ticket.answer(timeout_s=0)
        self.metrics.observe_answer(result.backend, result.timings_ms, result.num_bytes)
        return result
