"""Inference: POST /infer (bitstream + prompt -> answer) and POST /reconstruct (bitstream -> PNG)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..context import AppContext
from ..gateway import Gateway
from ..schemas import InferRequest, InferResponse
from ..transport import read_bitstream_body, read_model, respond
from .schema import ERROR_RESPONSES, inline_schema

INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/msgpack": {"schema": inline_schema(InferRequest)},
            "application/json": {"schema": inline_schema(InferRequest), "description": "bitstreams as base64 strings"},
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


def router(ctx: AppContext) -> APIRouter:
    """POST /infer and POST /reconstruct."""
    routes = ctx.keyed_router()

    @routes.post(
        "/infer",
        summary="bitstream + prompt -> answer",
        response_model=InferResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=INFER_BODY,
    )
    async def infer(request: Request, loaded: Gateway = Depends(ctx.ready_gateway)) -> Response:
        # read before the slot: a slow upload holds no queue place
        req = await read_model(request, InferRequest, ("bitstream",), ("support_bitstreams",))
        result = await ctx.run_inference(request, loaded, req.bitstream, req.prompt, req.task, req.backend, req.options, req.choices,
                                         req.support_bitstreams, req.support_labels, req.support_set)
        answer = InferResponse(
            text=result.text, backend=result.backend, task=result.task, bytes=result.num_bytes, bpp=result.bpp,
            image_size=result.image_size, rate=result.rate, timings_ms=result.timings_ms,
            random_weights=result.random_weights, note=result.note, details=result.details,
        )
        return respond(request, answer.model_dump(mode="json"))

    @routes.post(
        "/reconstruct",
        summary="bitstream -> PNG with g_s (for people; /infer never reconstructs)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES},
        openapi_extra=RECONSTRUCT_BODY,
    )
    async def reconstruct(request: Request, loaded: Gateway = Depends(ctx.ready_gateway)) -> Response:
        data = await read_bitstream_body(request)
        png = await ctx.admitted(loaded.reconstruct, data)
        return Response(png, media_type="image/png")

    return routes
