"""Prometheus metrics of the gateway, served at ``GET /metrics`` in Prometheus' text format.

Requests by route and status, their time, each pipeline stage's time per backend, the sizes of
the bitstreams answered, how many requests are admitted (queued or running), the model thread's
batch sizes and how many items wait for it. Kept in a
registry of the app's own (prometheus_client's default one is per process), so that several apps
in one process, as in the tests, count apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batcher import Batcher

#: 256 B to 4 MiB: a tiny preset's bitstream is about 1 KB, a 4096-px photo at rate 4 some hundreds.
BITSTREAM_BUCKETS = tuple(float(256 << i) for i in range(15))
#: 1 to 256 items (--max-batch is at most 256).
BATCH_BUCKETS = tuple(float(1 << i) for i in range(9))
#: timings_ms entries that are no stage time (the batch's size in items).
NOT_STAGES = ("batch_size",)
UNMATCHED = "unmatched"  # a path no route has (404s, refusals before routing): one label, not one per path


class Metrics:
    """The gateway's counters and histograms; ``in_flight`` reads the admitted requests when scraped."""

    def __init__(self, in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("comneck_requests", "HTTP requests answered, by route template and status code",
                                ["route", "status"], registry=self.registry)
        self.seconds = Histogram("comneck_request_seconds", "seconds from a request's start to its answer's start, by route",
                                 ["route"], registry=self.registry)
        self.stages = Histogram("comneck_stage_seconds", "server seconds of each stage of the answered inference requests "
                                "(parse, entropy_decode, queue, batch_wait, neck, clip_tail, backend, server_total)", ["stage", "backend"],
                                registry=self.registry)
        self.bitstreams = Histogram("comneck_bitstream_bytes", "bytes of the bitstreams of answered inference requests",
                                    buckets=BITSTREAM_BUCKETS, registry=self.registry)
        admitted = Gauge("comneck_admitted_requests", "requests past their upload: queued for the models or running",
                         registry=self.registry)
        admitted.set_function(lambda: float(in_flight()))
        self.batches = Histogram("comneck_batch_items", "items in each batch the model thread ran", buckets=BATCH_BUCKETS,
                                 registry=self.registry)
        self.queued = Gauge("comneck_queued_items", "items decoded and waiting for the model thread", registry=self.registry)

    def watch(self, batcher: Batcher) -> None:
        """Count ``batcher``'s batches and read its queue depth when scraped (once the gateway is loaded)."""
        batcher.on_batch = self.batches.observe
        self.queued.set_function(lambda: float(batcher.depth))

    def observe_answer(self, backend: str, timings_ms: Mapping[str, float], num_bytes: int) -> None:
        """One answered inference: its stage times and its bitstream's size."""
        for stage, ms in timings_ms.items():
            if stage not in NOT_STAGES:
                self.stages.labels(stage, backend).observe(ms / 1e3)
        self.bitstreams.observe(num_bytes)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRequests:
    """ASGI middleware: counts every HTTP answer by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", UNMATCHED)  # the router records the matched route in the scope
                self.metrics.requests.labels(route, str(message["status"])).inc()
                self.metrics.seconds.labels(route).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, counted)
