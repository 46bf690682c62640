"""Operations: the index, liveness, readiness, Prometheus metrics and the model list."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from comneck.errors import ErrorCode
from comneck.version import __version__

from ..context import AppContext
from ..errors import error_body
from ..gateway import Gateway
from ..schemas import ErrorResponse
from ..transport import respond


def router(ctx: AppContext) -> APIRouter:
    """GET /, /healthz, /readyz, /metrics and /v1/models."""
    routes = APIRouter()

    @routes.get("/", summary="what this is and where its documentation is")
    def root(request: Request) -> Response:
        return respond(request, {"service": "ComNeck gateway", "version": __version__, "docs": "/docs", "redoc": "/redoc",
                                 "openapi": "/openapi.json", "health": "/healthz", "ready": "/readyz", "models": "/v1/models",
                                 "metrics": "/metrics"})

    @routes.get("/healthz", summary="liveness: the process answers")
    def healthz(request: Request) -> Response:
        if ctx.load_error:
            return respond(request, error_body(ErrorCode.LOAD_FAILED, ctx.load_error), ErrorCode.LOAD_FAILED.status)
        return respond(request, {"status": "ok"})

    @routes.get("/readyz", summary="readiness: models loaded and warmed up", responses={503: {"model": ErrorResponse}})
    def readyz(request: Request) -> Response:
        loaded = ctx.ready_gateway()
        if loaded.workers is not None:
            loaded.workers.check()  # 503 decode_unavailable while no decode worker can start
        return respond(request, {"status": "ready", "preset": loaded.models.preset.name, "random_weights": loaded.random_weights,
                                 "backends": {name: loaded.pipeline.state(name) for name in loaded.pipeline.specs},
                                 "support_store": loaded.support_sets.state()})

    @routes.get("/metrics", summary="Prometheus metrics: requests, stage times, bitstream sizes, admitted requests",
                response_class=Response, responses={200: {"content": {"text/plain": {}}}}, dependencies=[Depends(ctx.authorized)])
    def prometheus_metrics() -> Response:
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    @routes.get("/v1/models", summary="codec, rate points, networks, backends, random-weight status", dependencies=[Depends(ctx.authorized)])
    def models(request: Request, loaded: Gateway = Depends(ctx.ready_gateway)) -> Response:
        return respond(request, loaded.model_list())

    return routes
