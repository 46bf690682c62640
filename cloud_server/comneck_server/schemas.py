"""Request and response bodies of the HTTP API (the OpenAPI schema at /docs comes from these)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from comneck.backends import GenerationOptions


class InferRequest(BaseModel):
    """The body of ``POST /infer`` as msgpack (a map with these keys); multipart sends the same fields."""

    model_config = ConfigDict(extra="forbid")

    bitstream: bytes = Field(description="a ComNeck container (docs/bitstream.md); msgpack bin")
    prompt: str = Field(description="the question or instruction for the backend; may be empty for task caption")
    task: str | None = Field(None, description="caption, vqa, rec or classify; default: the backend's first task")
    backend: str | None = Field(None, description="a loaded backend; default: the first that does the task, else the gateway's first")
    options: GenerationOptions = Field(default_factory=GenerationOptions)
    choices: list[str] | None = Field(
        None, description="a multiple-choice question's options, 2 to 26, answered by letter A, B, ... (honeybee); "
        "clip-zero-shot ranks them as its labels; multipart sends a JSON array"
    )
    support_bitstreams: list[bytes] | None = Field(
        None, description="task fewshot: the support examples' containers, one per label (multipart: repeated file parts)"
    )
    support_labels: list[str] | None = Field(
        None, description="task fewshot: each support example's class, at least 2 classes (multipart: a JSON array)"
    )
    support_set: str | None = Field(None, description="task fewshot: a support set registered with PUT /v1/support-sets/{name}")


class SupportSetRequest(BaseModel):
    """The body of ``PUT /v1/support-sets/{name}`` as msgpack; multipart sends the same fields."""

    model_config = ConfigDict(extra="forbid")

    support_bitstreams: list[bytes] = Field(description="the support examples' containers, one per label")
    support_labels: list[str] = Field(description="each example's class, at least 2 classes")
    backend: str | None = Field(None, description="the few-shot backend that describes them; default: the first doing fewshot")


class SupportSetInfo(BaseModel):
    """A registered support set."""

    name: str
    backend: str
    classes: list[str]
    examples: int


class InferResponse(BaseModel):
    """The answer and what it cost."""

    text: str
    backend: str
    task: str
    bytes: int = Field(description="size of the bitstream received")
    bpp: float = Field(description="bits per pixel of the image the codec saw (real container bytes)")
    image_size: list[int] = Field(min_length=2, max_length=2, description="[height, width] the codec saw")
    rate: int
    timings_ms: dict[str, float] = Field(
        description="parse, queue, entropy_decode, neck, clip_tail, backend, server_total"
    )
    random_weights: bool
    note: str
    details: dict[str, Any] = Field(default_factory=dict, description="backend specifics, e.g. ranked labels")


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable, e.g. truncated, codec_mismatch, prompt_too_long")
    message: str = Field(description="one line for people")


class ErrorResponse(BaseModel):
    error: ErrorBody
