"""The gateway's work without HTTP, and the FastAPI app in process (states that a real server
cannot be put in on demand: loading, load failure, busy)."""

import dataclasses
import io
import json
import threading

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from comneck.backends import GenerationOptions
from comneck.errors import ComneckInputError
from comneck.image import load_image, resize_for_codec, sample_photo, to_tensor
from comneck_edge import EdgeEncoder, GatewayClient, GatewayError
from comneck_server.app import create_app
from comneck_server.context import Admission
from comneck_server.errors import ApiError
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings, read_settings

PROMPT = "Labels: cow, horse, beach"


@pytest.fixture(scope="module")
def gateway(tiny_pipeline):
    return Gateway(tiny_pipeline, ServerSettings(max_prompt_chars=100))


@pytest.fixture(scope="module")
def encoded(tiny):
    return EdgeEncoder(tiny).encode_file(sample_photo())


def through(test_client: TestClient) -> GatewayClient:
    """A GatewayClient whose requests go to the in-process app."""

    def handler(request: httpx.Request) -> httpx.Response:
        answer = test_client.request(request.method, request.url.path, headers=request.headers, content=request.content)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return GatewayClient("http://testserver", transport=httpx.MockTransport(handler))


def test_infer_runs_the_latent_path_once_and_reports_it(gateway, encoded, tiny_models):
    result = gateway.infer(encoded.data, PROMPT, options=None)
    assert result.backend == "clip-zero-shot" and result.task == "classify"
    assert result.num_bytes == len(encoded.data) and result.bpp == pytest.approx(encoded.bpp)
    assert result.image_size == (256, 256) and result.rate == 1 and result.random_weights
    assert list(result.timings_ms) == ["parse", "entropy_decode", "queue", "batch_size", "batch_wait", "neck", "clip_tail", "backend",
                                       "server_total"]
    assert result.timings_ms["batch_size"] == 1
    # the answer is the backend's answer on CLIP's embedding of the neck's tokens
    with torch.inference_mode():
        y_hat = tiny_models.codec.entropy_decode(encoded.bitstream.latents)
        embedding = tiny_models.clip.tail(tiny_models.neck(y_hat)).embedding
    (expected,) = gateway.backends["clip-zero-shot"].generate(embedding, [PROMPT], "classify", [GenerationOptions()])
    assert (result.text, result.details) == (expected.text, expected.details)


def test_model_work_runs_one_request_at_a_time_on_one_thread(gateway, encoded, monkeypatch):
    """Many request threads, one model thread (one malloc arena: docs/benchmarks.md, "Memory")."""
    seen, running, overlap, lock = set(), [0], [False], threading.Lock()
    run = gateway.batcher.run_batch

    def watched(*args, **kwargs):
        with lock:
            seen.add(threading.current_thread().name)
            running[0] += 1
            overlap[0] |= running[0] > 1
        try:
            return run(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(gateway.batcher, "run_batch", watched)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(gateway.infer(encoded.data, PROMPT).text)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 4 and len(set(answers)) == 1
    assert len(seen) == 1 and next(iter(seen)).startswith("comneck-model") and not overlap[0]


def test_reconstruct_returns_the_g_s_image(gateway, encoded, tiny_models):
    png = Image.open(io.BytesIO(gateway.reconstruct(encoded.data)))
    assert png.format == "PNG" and png.size == (256, 256)
    with torch.inference_mode():
        x_hat = tiny_models.codec.synthesize(tiny_models.codec.entropy_decode(encoded.bitstream.latents))
    assert torch.allclose(to_tensor(png.convert("RGB")), x_hat, atol=1 / 255 + 1e-6)


@pytest.mark.parametrize(
    "prompt, task, backend, code",
    [
        ("  ", None, None, "empty_prompt"),
        ("x" * 101, None, None, "prompt_too_long"),
        (PROMPT, None, "llava", "unknown_backend"),
        (PROMPT, "poetry", None, "unknown_task"),
        (PROMPT, "caption", None, "unsupported_task"),
        ("only-one-label", None, None, "bad_prompt"),
    ],
)
def test_bad_requests_get_their_code(gateway, encoded, prompt, task, backend, code):
    with pytest.raises(ComneckInputError) as info:
        gateway.infer(encoded.data, prompt, task, backend)
    assert info.value.code == code


def test_latents_of_another_grid_are_refused_before_decoding(gateway, tiny):
    photo = to_tensor(resize_for_codec(load_image(sample_photo()), "none"))
    big = EdgeEncoder(tiny).encode_tensor(torch.nn.functional.interpolate(photo, size=(320, 320)))
    with pytest.raises(ComneckInputError) as info:
        gateway.infer(big.data, PROMPT)
    assert info.value.code == "unsupported_size" and "--resize paper" in str(info.value)


def test_a_336_gateway_starts_and_describes_its_geometry():
    # start-up warms up on a 384x384 image through the pipeline's checks, decoding, neck and tail
    gateway = Gateway.load(ServerSettings(preset="tiny-336"))
    try:
        described = gateway.describe()
        assert described["preset"] == "tiny-336" and described["codec"]["input_size"] == [384, 384]
        assert described["neck"]["tokens"] == 577 and described["clip"]["image_size"] == 336
    finally:
        gateway.close()


def test_admission_refuses_beyond_the_limit():
    admission = Admission(1)
    with admission.slot():
        with pytest.raises(ApiError) as info:
            with admission.slot():
                pass
        assert info.value.code == "busy" and info.value.retry_after == 1
    with admission.slot():  # the slot came back
        pass


def test_not_ready_then_ready(monkeypatch, gateway, encoded):
    release = threading.Event()

    def slow_load(settings):
        release.wait(30)
        return gateway

    monkeypatch.setattr(Gateway, "load", staticmethod(slow_load))
    monkeypatch.setattr(gateway, "close", lambda: None)  # the app stops what it loaded: not the module's shared gateway
    with TestClient(create_app(ServerSettings())) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        assert response.headers["retry-after"] == "2"
        assert client.post("/infer").json()["error"]["code"] == "not_ready"
        release.set()
        through(client).wait_ready(10)
        assert client.get("/readyz").json() == {"status": "ready", "preset": "tiny", "random_weights": True,
                                               "backends": {"clip-zero-shot": "loaded"}, "support_store": "memory"}


def test_a_failed_load_is_reported_not_hidden(tmp_path):
    bad = tmp_path / "neck.safetensors"
    bad.write_bytes(b"junk")
    with TestClient(create_app(ServerSettings(neck_weights=bad))) as client:
        with pytest.raises(GatewayError) as info:
            through(client).wait_ready(30)
        assert info.value.code == "load_failed" and "neck weights" in str(info.value)
        assert client.get("/healthz").status_code == 503


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"Authorization": "Bearer k2"}, 200),
        ({"Authorization": "bearer k2"}, 200),  # the scheme in any case
        ({"Authorization": "BEARER   k1 "}, 200),
        ({"X-API-Key": "k1"}, 200),
        ({"Authorization": "Bearer k1", "X-API-Key": "k2"}, 200),
        ({}, 401),
        ({"X-API-Key": "k3"}, 401),
        ({"Authorization": "k2"}, 401),  # a bare key is no bearer token
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Basic azE6"}, 401),
        ({"Authorization": "Bearer k2", "X-API-Key": ""}, 401),  # every key presented must be right
        ({"Authorization": "Bearer k3", "X-API-Key": "k1"}, 401),
        ({"Authorization": "", "X-API-Key": "k1"}, 401),
    ],
)
def test_api_keys_follow_one_rule(gateway, headers, status):
    with TestClient(create_app(ServerSettings(api_keys=["k1", "k2"]), gateway)) as client:
        assert client.get("/healthz").status_code == 200  # probes need no key
        answer = client.get("/v1/models", headers=headers)
        assert answer.status_code == status, answer.text
        if status == 401:
            assert answer.json()["error"]["code"] == "unauthorized" and answer.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        [("Content-Length", "5"), ("Content-Length", "6")],
        [("Content-Length", "+5")],
        [("Content-Length", "0x5")],
    ],
)
def test_ambiguous_framing_is_refused_before_the_body(gateway, headers):
    with TestClient(create_app(ServerSettings(), gateway)) as client:
        answer = client.post("/infer", content=b"hello", headers=[("Content-Type", "application/msgpack"), *headers])
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, "bad_request"), answer.text
    assert answer.headers["connection"] == "close"


@pytest.fixture
def no_decoding(monkeypatch, tiny_pipeline):
    """Entropy decoding replaced by a recorder that fails the request: what a test must not reach."""
    calls = []

    def refuse(latents):
        calls.append(latents)
        raise AssertionError("entropy decoding ran")

    monkeypatch.setattr(tiny_pipeline, "entropy_decode", refuse)
    return calls


def test_a_bad_prompt_is_refused_before_entropy_decoding(tiny_pipeline, encoded, no_decoding):
    labels = ", ".join(f"label{i}" for i in range(65))  # clip-zero-shot takes 64 at most
    settings = ServerSettings()
    with TestClient(create_app(settings, Gateway(tiny_pipeline, settings)), raise_server_exceptions=False) as client:
        answer = client.post("/infer", files={"bitstream": ("x.cnk", encoded.data)}, data={"prompt": f"Labels: {labels}"})
        assert (answer.status_code, answer.json()["error"]["code"]) == (422, "bad_prompt") and not no_decoding
        assert client.post("/infer", files={"bitstream": ("x.cnk", encoded.data)}, data={"prompt": PROMPT}).status_code == 500
    assert len(no_decoding) == 1  # a good prompt reaches decoding: the recorder is in its path


def test_reconstruct_refuses_images_over_the_pixel_limit_before_decoding(tiny_pipeline, encoded, no_decoding):
    settings = ServerSettings(max_reconstruct_pixels=256 * 256 - 1)
    with TestClient(create_app(settings, Gateway(tiny_pipeline, settings))) as client:
        answer = client.post("/reconstruct", content=encoded.data, headers={"Content-Type": "application/octet-stream"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "image_too_large") and not no_decoding
    assert "256x256 image (65536 pixels)" in answer.json()["error"]["message"]
    with pytest.raises(AssertionError, match="entropy decoding ran"):  # at the limit it decodes
        Gateway(tiny_pipeline, ServerSettings(max_reconstruct_pixels=256 * 256)).reconstruct(encoded.data)


def test_client_retries_429_and_503_with_backoff(monkeypatch):
    calls, slept = [], []
    monkeypatch.setattr("comneck_edge.client.time.sleep", slept.append)

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503 if len(calls) == 1 else 429, headers={"Retry-After": "0"}, json={"error": {"code": "busy", "message": "busy"}})
        return httpx.Response(200, json={"object": "list", "data": []})

    client = GatewayClient("http://gw", retries=3, transport=httpx.MockTransport(handler))
    assert client.models() == {"object": "list", "data": []} and len(calls) == 3
    assert len(slept) == 2 and 0 <= slept[0] <= 0.5 and 0 <= slept[1] <= 1.0
    calls.clear()
    client = GatewayClient("http://gw", retries=1, backoff=0.0, transport=httpx.MockTransport(lambda r: calls.append(r) or httpx.Response(503, json={"error": {"code": "busy", "message": "try later"}})))
    with pytest.raises(GatewayError) as info:
        client.models()
    assert len(calls) == 2 and info.value.status == 503 and str(info.value) == "server answered 503 busy: try later"


def test_settings_from_the_environment_and_flags(monkeypatch):
    monkeypatch.setenv("COMNECK_API_KEYS", "a, b")
    monkeypatch.setenv("COMNECK_MAX_BODY_BYTES", "1000")
    settings = read_settings(["--max-body-bytes", "2000", "--backends", "clip-zero-shot"])
    assert settings.api_keys == ["a", "b"] and settings.max_body_bytes == 2000
    assert settings.backend_args == ["clip-zero-shot"]
    repeated = read_settings(["--backend", "clip-zero-shot", "--backend", "other=/w"])
    assert repeated.backend_args == ["clip-zero-shot", "other=/w"]
    monkeypatch.setenv("COMNECK_BACKEND", "shikra=/d,base=/b,clip-zero-shot")
    assert read_settings([]).backend_args == ["shikra=/d,base=/b", "clip-zero-shot"]
    monkeypatch.setenv("COMNECK_BACKEND", "clip-zero-shot")
    assert read_settings([]).backend_args == ["clip-zero-shot"]
    assert dataclasses.asdict(settings.weight_files) == {"codec": None, "neck": None, "clip": None}


def test_client_waits_retry_after_plus_jitter(monkeypatch):
    """Never sooner than Retry-After; on top a uniform share of the exponential backoff, so clients
    refused at once come back spread out."""
    slept, shares = [], []
    monkeypatch.setattr("comneck_edge.client.time.sleep", slept.append)
    monkeypatch.setattr("comneck_edge.client.random.uniform", lambda low, high: shares.append((low, high)) or high)
    busy = httpx.Response(503, headers={"Retry-After": "2"}, json={"error": {"code": "busy", "message": "busy"}})
    client = GatewayClient("http://gw", retries=3, backoff=0.5, transport=httpx.MockTransport(lambda r: busy))
    with pytest.raises(GatewayError):
        client.models()
    assert shares == [(0, 0.5), (0, 1.0), (0, 2.0)] and slept == [2.5, 3.0, 4.0]



def test_a_taken_port_is_one_line_before_anything_loads(capsys, monkeypatch):
    import socket

    from comneck_server import cli

    monkeypatch.setattr("comneck_server.app.create_app", lambda *a: pytest.fail("loaded models for a port it cannot take"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"comneck-server: error: cannot listen on 127.0.0.1:{port}") and "--port" in err and err.count("\n") == 1
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("comneck-server ")


def test_server_help_names_the_environment_variables(capsys):
    from comneck_server import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "{Path,null}" not in out and "list[str]" not in out
    usage = " ".join(out.split("\n\n")[0].split())
    for shown in ("--weights PATH", "--backend NAME[=WEIGHTS]", "--api-keys KEYS", "--port N", "--host HOST",
                  "--decode-timeout-s SECONDS", "--dtype {float32,float16,bfloat16}", "--lazy-backends | --no-lazy-backends"):
        assert shown in usage, shown
    assert all(f"COMNECK_{name.upper()}" in out.replace("\n", " ").replace("  ", " ") for name in ServerSettings.model_fields)


def test_metrics_count_requests_stage_times_and_bitstream_bytes(gateway, encoded):
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(create_app(ServerSettings(), gateway)) as client:
        answer = through(client).infer(encoded.data, PROMPT)
        refused = client.post("/infer", content=b"\x00", headers={"Content-Type": "application/octet-stream"})
        assert refused.status_code == 415 and client.get("/no/such/page").status_code == 404
        scraped = client.get("/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain; version=")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(scraped.text) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("comneck_requests_total", route="/infer", status="200") == 1
    assert value("comneck_requests_total", route="/infer", status="415") == 1
    assert value("comneck_requests_total", route="unmatched", status="404") == 1
    assert value("comneck_request_seconds_count", route="/infer") == 2
    assert value("comneck_batch_items_count") == 1 and value("comneck_batch_items_sum") == 1  # the one request (the warm-up runs alone)
    assert value("comneck_queued_items") == 0
    for stage, ms in answer["timings_ms"].items():  # the stage times are the ones the answer reported
        if stage == "batch_size":
            continue
        assert value("comneck_stage_seconds_count", stage=stage, backend="clip-zero-shot") == 1
        assert value("comneck_stage_seconds_sum", stage=stage, backend="clip-zero-shot") == pytest.approx(ms / 1e3)
    assert value("comneck_bitstream_bytes_sum") == len(encoded.data) and value("comneck_bitstream_bytes_count") == 1
    assert value("comneck_admitted_requests") == 0
    with TestClient(create_app(ServerSettings(api_keys=["k1"]), gateway)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200


def _chat(data: bytes, text: str, **fields) -> dict:
    url = "data:application/x-comneck;base64," + __import__("base64").b64encode(data).decode()
    return {"model": "clip-zero-shot", **fields,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]}


def test_chat_logprobs_of_a_classifier_are_its_ranked_labels(gateway, encoded):
    with TestClient(create_app(ServerSettings(), gateway)) as client:
        answer = client.post("/v1/chat/completions", json=_chat(encoded.data, PROMPT, logprobs=True, top_logprobs=3))
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    (step,) = choice["logprobs"]["content"]  # one "token": the label answered, the ranked labels as its alternatives
    ranked = answer.json()["comneck"]["details"]["logprobs"]
    assert step["token"] == choice["message"]["content"] == ranked[0]["label"] and step["logprob"] == ranked[0]["logprob"]
    assert [t["token"] for t in step["top_logprobs"]] == [r["label"] for r in ranked] and len(ranked) == 3
    assert step["bytes"] == list(step["token"].encode())


def test_a_seed_beyond_64_bits_is_refused_in_chat_as_in_infer(gateway, encoded):
    with TestClient(create_app(ServerSettings(), gateway)) as client:
        chat = client.post("/v1/chat/completions", json=_chat(encoded.data, PROMPT, seed=2**63))
        infer = client.post("/infer", files={"bitstream": ("x.cnk", encoded.data)},
                            data={"prompt": PROMPT, "options": '{"seed": 18446744073709551615}'})
        assert client.post("/v1/chat/completions", json=_chat(encoded.data, PROMPT, seed=2**63 - 1)).status_code == 200
    for answer in (chat, infer):
        assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_request"), answer.text
        assert "seed" in answer.json()["error"]["message"]


LONE = "\ud800"


@pytest.mark.parametrize("place", ["chat label", "json prompt label", "json choices", "multipart choices", "support-set label"])
def test_a_lone_surrogate_anywhere_an_answer_repeats_text_is_a_4xx(gateway, encoded, place):
    import base64

    b64 = base64.b64encode(encoded.data).decode()

    def post_json(path: str, body: dict) -> httpx.Response:  # json.dumps escapes the surrogate, as a client's JSON would
        return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})

    with TestClient(create_app(ServerSettings(), gateway), raise_server_exceptions=False) as client:
        if place == "chat label":
            answer = post_json("/v1/chat/completions", _chat(encoded.data, f"Labels: cow, {LONE}"))
        elif place == "json prompt label":
            answer = post_json("/infer", {"bitstream": b64, "prompt": f"Labels: cow, {LONE}"})
        elif place == "json choices":
            answer = post_json("/infer", {"bitstream": b64, "prompt": "What is it?", "choices": ["cow", LONE]})
        elif place == "multipart choices":
            answer = client.post("/infer", files={"bitstream": ("x.cnk", encoded.data)},
                                 data={"prompt": "What is it?", "choices": '["cow", "\\ud800"]'})
        else:
            answer = client.put("/v1/support-sets/pets", files=[("support_bitstreams", ("a.cnk", encoded.data)),
                                                                 ("support_bitstreams", ("b.cnk", encoded.data))],
                                data={"support_labels": '["cat", "\\udfff"]'})
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_request"), answer.text
    assert "lone surrogate" in answer.json()["error"]["message"]


def _every_route(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in, the docs' script files left out:
    FastAPI's own pages from ``app.routes``, the routers' routes from the OpenAPI schema (since FastAPI 0.137 an
    included router is one entry of ``app.routes`` without a path)."""
    from starlette.routing import Mount

    pages = [(method, route.path) for route in app.routes if hasattr(route, "path") and not isinstance(route, Mount)
             for method in sorted(route.methods or ())]
    operations = [(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item]
    return [(method, path.replace("{name}", "pets")) for method, path in dict.fromkeys(pages + operations) if method != "HEAD"]


OPEN_ROUTES = {("GET", "/healthz"), ("GET", "/readyz")}
DOCS_ROUTES = {("GET", "/"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")}


@pytest.mark.parametrize("public_docs", [False, True])
def test_with_keys_every_route_but_the_probes_needs_one_and_public_docs_opens_the_docs(gateway, public_docs):
    app = create_app(ServerSettings(api_keys=["k1"], public_docs=public_docs), gateway)
    routes = _every_route(app)
    assert OPEN_ROUTES | DOCS_ROUTES <= set(routes) and ("POST", "/infer") in routes and len(routes) >= 14
    with TestClient(app) as client:
        for method, path in routes:
            anonymous = client.request(method, path)
            keyed = client.request(method, path, headers={"X-API-Key": "k1"})
            if (method, path) in OPEN_ROUTES or (public_docs and (method, path) in DOCS_ROUTES):
                assert anonymous.status_code == 200, (method, path, anonymous.text)
            else:
                assert anonymous.status_code == 401, (method, path, anonymous.text)
                assert anonymous.json()["error"]["code"] == "unauthorized" and anonymous.headers["www-authenticate"] == "Bearer"
                assert keyed.status_code != 401, (method, path, keyed.text)
        assert client.get("/openapi.json", headers={"Authorization": "Bearer k1"}).json()["info"]["title"] == "ComNeck gateway"
        assert client.get("/docs", headers={"X-API-Key": "k1"}).text.count("swagger-ui") >= 1


def test_a_long_registration_runs_in_pieces_that_inference_interleaves_with(tiny_pipeline, encoded, monkeypatch):
    """A 20-example registration is described 8 + 8 + 4 at a time; an inference asked while the first
    piece runs is answered after that piece, long before the registration ends (3 s)."""
    import time

    from comneck.backends import BackendSpec
    from comneck.clip_split import ClipTap

    class Described:  # a few-shot backend whose descriptions take 1 s a piece
        spec = BackendSpec("stub-fewshot", "x:Y", "test stub", ("fewshot",), ClipTap("embedding", tokens="cls"))
        random_weights = True

        def check_support(self, labels):
            pass

    pieces, started = [], threading.Event()

    def describe_images(streams, backend):
        pieces.append(len(streams))
        started.set()
        time.sleep(1.0)
        return [f"words {len(pieces)}"] * len(streams)

    monkeypatch.setitem(tiny_pipeline.backends, "stub-fewshot", Described())
    monkeypatch.setattr(tiny_pipeline, "describe_images", describe_images)
    gateway = Gateway(tiny_pipeline, ServerSettings())
    labels = [("cat", "dog")[i % 2] for i in range(20)]
    done: dict[str, float] = {}

    def register():
        entry = gateway.register_support("pets", [encoded.data] * 20, labels, "stub-fewshot")
        done["registration"] = time.perf_counter()
        done["examples"] = [e.description for e in entry.examples]

    thread = threading.Thread(target=register)
    thread.start()
    assert started.wait(10)
    asked = time.perf_counter()
    answer = gateway.infer(encoded.data, PROMPT, backend="clip-zero-shot")
    answered = time.perf_counter()
    thread.join(30)
    assert pieces == [8, 8, 4] and answer.text in ("cow", "horse", "beach")
    assert answered - asked < 1.9 < done["registration"] - asked  # one piece at most (and the answer), not the three
    assert done["examples"] == ["words 1"] * 8 + ["words 2"] * 8 + ["words 3"] * 4
    gateway.support_sets.delete("pets")


def test_a_long_reconstruct_runs_in_its_own_lane_and_holds_no_inference_up(tiny_pipeline, encoded, monkeypatch):
    import time

    started = threading.Event()
    real = tiny_pipeline.reconstruct

    def slow(stream):
        started.set()
        time.sleep(2.0)  # a 4096 x 4096 g_s takes seconds
        return real(stream)

    monkeypatch.setattr(tiny_pipeline, "reconstruct", slow)
    gateway = Gateway(tiny_pipeline, ServerSettings())
    png: list[bytes] = []
    thread = threading.Thread(target=lambda: png.append(gateway.reconstruct(encoded.data)))
    thread.start()
    assert started.wait(10)
    asked = time.perf_counter()
    answer = gateway.infer(encoded.data, PROMPT, backend="clip-zero-shot")
    answered = time.perf_counter() - asked
    thread.join(30)
    assert answer.text in ("cow", "horse", "beach") and answered < 1.5 and png[0][:4] == b"\x89PNG"
    gateway.close()
