"""The OpenAI-compatible endpoints, driven by the official ``openai`` client against a running gateway."""

import base64
import os

import openai
import pytest

from comneck.image import sample_photo
from comneck_edge import EdgeEncoder
from comneck_server.demo import local_gateway
from comneck_server.openai_chat import DATA_URL

PROMPT = "What is in the photo? Labels: cow, horse, beach"


def message(data: bytes, text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": DATA_URL + base64.b64encode(data).decode()}}]}]


def test_the_openai_client_lists_models_and_chats_with_a_bitstream(tiny):
    data = EdgeEncoder(tiny).encode_file(sample_photo()).data
    with local_gateway("tiny", env={**os.environ, "COMNECK_API_KEYS": "sk-test"}) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-test", max_retries=0)
        assert [m.id for m in client.models.list()] == ["clip-zero-shot"]
        done = client.chat.completions.create(model="clip-zero-shot", messages=message(data))
        assert done.object == "chat.completion" and done.model == "clip-zero-shot"
        answer = done.choices[0].message
        assert answer.role == "assistant" and answer.content in ("cow", "horse", "beach") and done.choices[0].finish_reason == "stop"
        measured = done.model_extra["comneck"]
        assert measured["bytes"] == len(data) and measured["random_weights"] and measured["details"]["labels"][0]["label"] == answer.content
        streamed = list(client.chat.completions.create(model="clip-zero-shot", messages=message(data), stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer.content
        assert streamed[-1].choices[0].finish_reason == "stop"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0).models.list()
        refusals = [
            (dict(model="clip-zero-shot", messages=[{"role": "user", "content": PROMPT}]), "exactly one image_url"),
            (dict(model="nope", messages=message(data)), "not loaded here"),
            (dict(model="clip-zero-shot", messages=[{"role": "system", "content": "be brief"}, *message(data)]), "one user message"),
            (dict(model="clip-zero-shot", messages=message(b"not a container")), "not a ComNeck bitstream"),
        ]
        for kwargs, text in refusals:
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(**kwargs)
            assert 400 <= info.value.status_code < 500 and text in str(info.value), str(info.value)
