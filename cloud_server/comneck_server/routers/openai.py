"""The OpenAI-compatible surface: POST /v1/chat/completions, one user message with the bitstream
as an image URL, answered as a completion or as server-sent events (:mod:`comneck_server.openai_chat`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..context import AppContext
from ..gateway import Gateway
from ..openai_chat import ChatRequest, chunks, completion
from ..transport import read_model
from .schema import ERROR_RESPONSES, inline_schema

CHAT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(ChatRequest)}}}}


def router(ctx: AppContext) -> APIRouter:
    """POST /v1/chat/completions (GET /v1/models, which OpenAI clients also read, is an operations route)."""
    routes = ctx.keyed_router()

    @routes.post(
        "/v1/chat/completions",
        summary="OpenAI's chat API: one user message with the bitstream as a data:application/x-comneck;base64 image URL",
        responses=ERROR_RESPONSES,
        openapi_extra=CHAT_BODY,
    )
    async def chat_completions(request: Request, loaded: Gateway = Depends(ctx.ready_gateway)) -> Response:
        req = await read_model(request, ChatRequest, ())
        data, prompt = req.query()
        result = await ctx.run_inference(request, loaded, data, prompt, req.task, req.model, req.options())
        done = completion(req, result)
        if req.stream:
            return StreamingResponse(chunks(done), media_type="text/event-stream")
        return JSONResponse(done)

    return routes
