"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (Schemathesis): every
route, every content type the schema names (msgpack, JSON, multipart, octet-stream) and the chat
endpoint. No request may get a 5xx, every answer must conform to the schema, and every refusal must
carry a coded error. ``benchmarks/fuzz_api.py`` runs the same checks longer and counts what it tried."""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comneck.errors import ErrorCode
from comneck.image import sample_photo
from comneck_edge import EdgeEncoder
from comneck_server.app import create_app
from comneck_server.gateway import Gateway
from comneck_server.openai_chat import DATA_URL
from comneck_server.settings import ServerSettings

#: examples per operation in `make test`; the benchmark raises it (COMNECK_FUZZ_EXAMPLES)
EXAMPLES = int(os.environ.get("COMNECK_FUZZ_EXAMPLES", "25"))
CODES = {code.value for code in ErrorCode}


@schemathesis.serializer("application/msgpack", "application/x-msgpack")
def _msgpack(ctx: object, value: object) -> bytes:
    return msgpack.packb(value)


def with_real_containers(case: schemathesis.Case, data: bytes) -> st.SearchStrategy[schemathesis.Case]:
    """The generated case as it is, with valid containers where it carries bitstreams, or with valid
    containers and a routable backend, task and labelled prompt besides, so the fuzzing reaches
    decoding, the neck, CLIP and the backend with generated prompts, choices and options."""
    body = case.body
    if isinstance(body, (bytes, str)) and case.media_type == "application/octet-stream":  # /reconstruct
        return st.sampled_from([case.body, data]).map(lambda value: setattr(case, "body", value) or case)
    if not isinstance(body, dict):
        return st.just(case)
    value: bytes | str = base64.b64encode(data).decode() if case.media_type == "application/json" else data

    def real(level: int) -> schemathesis.Case:
        if level and "messages" in body:  # the chat endpoint: one user message with a generated text and the container
            first = body["messages"][0] if isinstance(body["messages"], list) and body["messages"] else {}
            text = first.get("content") if isinstance(first, dict) and isinstance(first.get("content"), str) else ""
            text += " Labels: a cow, a beach" if level == 2 else ""
            body["messages"] = [{"role": "user", "content": [{"type": "text", "text": text},
                                                             {"type": "image_url", "image_url": {"url": DATA_URL + base64.b64encode(data).decode()}}]}]
            body.update({"model": "clip-zero-shot"} if level == 2 else {})
            body.pop("task", None) if level == 2 else None
            return case
        for name, real_value in (("bitstream", value), ("support_bitstreams", [value, value])):
            if level and name in body:
                body[name] = real_value
        if level == 2:
            body.pop("task", None), body.pop("support_set", None), body.pop("support_labels", None), body.pop("support_bitstreams", None)
            body["backend"] = "clip-zero-shot"
            if "prompt" in body:
                body["prompt"] = f"{body['prompt'] if isinstance(body['prompt'], str) else ''} Labels: a cow, a beach"
        return case

    return st.sampled_from([0, 1, 2]).map(real)


@pytest.fixture(scope="module")
def api_schema(tiny_pipeline, tiny):
    app = create_app(ServerSettings(max_prompt_chars=500), Gateway(tiny_pipeline, ServerSettings(max_prompt_chars=500)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    data = EdgeEncoder(tiny).encode_file(sample_photo()).data

    @schema.hook
    def flatmap_case(context: object, case: schemathesis.Case) -> st.SearchStrategy[schemathesis.Case]:
        return with_real_containers(case, data)

    return schema


@schemathesis.check
def coded_error(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every 4xx and 5xx answer is the gateway's error body with a known code."""
    if response.status_code < 400:
        return None
    body = response.json() if "json" in response.headers.get("content-type", [""])[0] else msgpack.unpackb(response.content)
    code = body.get("error", {}).get("code")
    assert code in CODES, f"{response.status_code} without a known error code: {body}"
    return True


CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance, coded_error]


def fuzz(api_schema, examples: int) -> dict[str, Counter[int]]:
    """Hypothesis over every operation of the schema, ``examples`` cases each (derandomised: the same
    cases every run); per operation, how many answers of each status it got."""
    statuses: dict[str, Counter[int]] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        seen = statuses[operation.label] = Counter()

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
        def run(case: schemathesis.Case) -> None:
            seen[case.call_and_validate(checks=CHECKS).status_code] += 1

        run()
    return statuses


def test_no_request_gets_a_5xx_and_every_answer_conforms(api_schema):
    statuses = fuzz(api_schema, EXAMPLES)
    if report := os.environ.get("COMNECK_FUZZ_REPORT"):  # benchmarks/fuzz_api.py reads it
        Path(report).write_text(json.dumps({label: dict(seen) for label, seen in statuses.items()}))
    assert {"POST /infer", "POST /v1/chat/completions", "PUT /v1/support-sets/{name}", "POST /reconstruct"} <= set(statuses)
    assert all(sum(seen.values()) > 0 for seen in statuses.values()), statuses
    for label in ("POST /infer", "POST /v1/chat/completions", "POST /reconstruct"):  # the fuzzing reaches the models
        assert statuses[label][200] > 0, (label, statuses[label])
    assert not [s for seen in statuses.values() for s in seen if s >= 500]
