"""Support sets: register, list and forget named few-shot support examples (PUT, GET, DELETE /v1/support-sets)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..context import AppContext
from ..gateway import Gateway
from ..schemas import SupportSetInfo, SupportSetRequest
from ..transport import read_model, respond
from .schema import ERROR_RESPONSES, inline_schema

SUPPORT_SET_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/msgpack": {"schema": inline_schema(SupportSetRequest)},
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


def router(ctx: AppContext) -> APIRouter:
    """PUT /v1/support-sets/{name}, GET /v1/support-sets, DELETE /v1/support-sets/{name}."""
    routes = ctx.keyed_router()

    @routes.put(
        "/v1/support-sets/{name}",
        summary="register labelled few-shot support bitstreams under a name (described once, reused by requests)",
        response_model=SupportSetInfo,
        responses=ERROR_RESPONSES,
        openapi_extra=SUPPORT_SET_BODY,
    )
    async def put_support_set(name: str, request: Request, loaded: Gateway = Depends(ctx.ready_gateway)) -> Response:
        req = await read_model(request, SupportSetRequest, (), ("support_bitstreams",))
        entry = await ctx.admitted(loaded.register_support, name, req.support_bitstreams, req.support_labels, req.backend)
        return respond(request, SupportSetInfo(**entry.describe()).model_dump())

    @routes.get("/v1/support-sets", summary="the registered support sets")
    def support_sets(request: Request, loaded: Gateway = Depends(ctx.ready_gateway)) -> Response:
        return respond(request, {"support_sets": [entry.describe() for entry in loaded.support_sets.all()]})

    @routes.delete("/v1/support-sets/{name}", summary="forget a support set", response_model=SupportSetInfo,
                   responses=ERROR_RESPONSES)
    def delete_support_set(name: str, request: Request, loaded: Gateway = Depends(ctx.ready_gateway)) -> Response:
        return respond(request, SupportSetInfo(**loaded.support_sets.delete(name).describe()).model_dump())

    return routes
