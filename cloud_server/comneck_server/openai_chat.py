"""``POST /v1/chat/completions``: OpenAI's chat API in front of the gateway, so OpenAI and vLLM
clients send a ComNeck bitstream where they would send an image.

A request's last (and only) user message holds the text and one image part whose URL is the
container as a data URL, ``data:application/x-comneck;base64,...``; ``model`` names the backend.
The answer is OpenAI's ``chat.completion`` (or, with ``stream``, its ``chat.completion.chunk``
events over server-sent events), with ComNeck's details (bpp, timings, backend details) under
``comneck``. The backend generates the whole answer before the first event: streaming here keeps
OpenAI clients working, it does not shorten the time to the first token.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from comneck.backends import GenerationOptions
from comneck.errors import ComneckInputError, ErrorCode
from comneck.pipeline import Answer

DATA_URL = "data:application/x-comneck;base64,"


class ImageURL(BaseModel):
    url: str = Field(description=f"the .cnk container as {DATA_URL}...")


class ContentPart(BaseModel):
    """One part of a message's content: text, or the bitstream as an image URL."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    """OpenAI's chat-completions request, the fields that apply here; ``task`` is ComNeck's own."""

    model_config = ConfigDict(extra="ignore")  # clients send fields that do not apply (n, user, ...)

    model: str = Field(description="the backend, as GET /v1/models lists it")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1024)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    task: str | None = Field(None, description="ComNeck: caption, vqa, rec, classify; default: the backend's first")

    def query(self) -> tuple[bytes, str]:
        """The bitstream and the prompt of the one user message."""
        if len(self.messages) != 1 or self.messages[0].role != "user":
            raise ComneckInputError("send one user message (its text and the bitstream): conversations are not supported",
                                    ErrorCode.INVALID_REQUEST)
        content = self.messages[0].content
        parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
        images = [p.image_url.url for p in parts if p.type == "image_url" and p.image_url is not None]
        if len(images) != 1 or not images[0].startswith(DATA_URL):
            raise ComneckInputError(f"the user message needs exactly one image_url part holding the bitstream as {DATA_URL}...",
                                    ErrorCode.INVALID_REQUEST)
        try:
            data = base64.b64decode(images[0][len(DATA_URL):], validate=True)
        except binascii.Error:
            raise ComneckInputError("the image_url's base64 is broken", ErrorCode.INVALID_REQUEST) from None
        return data, " ".join(p.text for p in parts if p.type == "text" and p.text)

    def options(self) -> GenerationOptions:
        """The decoding options these fields ask for (unset ones keep ComNeck's defaults)."""
        fields: dict[str, Any] = {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "seed": self.seed, "logprobs": (self.top_logprobs or 1) if self.logprobs else None,
        }
        try:
            return GenerationOptions(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:  # a bound these fields do not share with GenerationOptions: the client's value
            first = exc.errors()[0]
            raise ComneckInputError(f"{first['loc'][0]}: {first['msg']}", ErrorCode.INVALID_REQUEST) from None


def completion(request: ChatRequest, answer: Answer) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` for one answer, ComNeck's measurements under ``comneck``."""
    details = answer.details
    prompt_tokens, completion_tokens = len(details.get("prompt_token_ids", [])), len(details.get("token_ids", []))
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                              "finish_reason": details.get("finish_reason", "stop"), "logprobs": None}
    if "logprobs" in details and isinstance(details["logprobs"], list) and request.logprobs:
        choice["logprobs"] = {"content": _openai_logprobs(details["logprobs"])}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": answer.backend,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        "comneck": {"task": answer.task, "bytes": answer.num_bytes, "bpp": answer.bpp, "image_size": list(answer.image_size),
                    "timings_ms": answer.timings_ms, "random_weights": answer.random_weights, "note": answer.note, "details": details},
    }


def _openai_logprobs(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A backend's log-probabilities as OpenAI writes them: one entry per generated token (token,
    logprob, bytes, top_logprobs). A classifier (clip-zero-shot) ranks labels instead of generating
    tokens; its answer is one "token", the best label, with the ranked labels as the alternatives."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    if steps and "label" in steps[0]:  # the label distribution, highest first
        ranked = [entry(step["label"], step["logprob"]) for step in steps]
        return [{**ranked[0], "top_logprobs": ranked}]
    return [{**entry(step["token"], step["logprob"]), "top_logprobs": [entry(t["token"], t["logprob"]) for t in step.get("top_logprobs", [])]}
            for step in steps]


def chunks(done: dict[str, Any]) -> Iterator[str]:
    """A finished completion as OpenAI's server-sent events: the role, the content, the finish
    reason (with usage and ComNeck's details), then ``[DONE]``."""
    head = {key: done[key] for key in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = done["choices"][0]
    events = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": choice["message"]["content"]}, "logprobs": choice["logprobs"],
                              "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}], "usage": done["usage"],
         "comneck": done["comneck"]},
    ]
    for event in events:
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"
