"""What the OpenAPI schema declares that FastAPI cannot infer: the coded refusals of every route,
and the request bodies of the routes that read their bodies themselves (msgpack, JSON, multipart)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ..schemas import ErrorResponse

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


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
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
