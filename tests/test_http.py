"""A real gateway (``comneck-server`` under uvicorn on 127.0.0.1) driven by the real edge CLI
and by raw HTTP: round trips in msgpack and multipart, and every bad-input case."""

import dataclasses
import json
import os
import subprocess
import sys
import zlib

import httpx
import msgpack
import pytest

from comneck.bitstream import Bitstream
from comneck.image import sample_photo
from comneck_edge import EdgeEncoder
from comneck_server.demo import free_port, local_gateway

API_KEY = "test-key"
LIMIT = 64 * 1024
PROMPT = "Labels: cow, horse, beach"


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, "COMNECK_API_KEYS": f"other-key,{API_KEY}"}
    with local_gateway("tiny", "--max-body-bytes", str(LIMIT), "--max-prompt-chars", "500", env=env, timeout=120) as client:
        yield client.url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def good(tiny) -> bytes:
    return EdgeEncoder(tiny).encode_file(sample_photo()).data


def edge(*args: str, key: str | None = API_KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COMNECK_API_KEY"}
    if key:
        env["COMNECK_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "comneck_edge.cli", *args], capture_output=True, text=True, env=env)


def one_line_error(run: subprocess.CompletedProcess, *expected: str) -> None:
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith("comneck-edge: error:") and run.stderr.count("\n") == 1, run.stderr
    for text in expected:
        assert text in run.stderr


def test_cli_round_trip_msgpack(server, tmp_path):
    out = tmp_path / "cow.cnk"
    run = edge("encode", str(sample_photo()), "--server", server, "--prompt", PROMPT, "-o", str(out))
    assert run.returncode == 0, run.stderr
    for expected in ("answer", "clip-zero-shot (task classify)", "ranking", "bpp", "edge (ms)", "entropy_decode", "backend", "RANDOM WEIGHTS"):
        assert expected in run.stdout
    answer = run.stdout.split("answer", 1)[1].split("\n")[0].strip()
    assert answer in ("cow", "horse", "beach")
    assert out.read_bytes()[:4] == b"CNKB"


def test_cli_round_trip_multipart_json(server):
    run = edge("encode", str(sample_photo()), "--server", server, "--prompt", PROMPT, "--format", "multipart",
               "--json", "--option", "top_k=2", "--task", "classify", "--backend", "clip-zero-shot")
    assert run.returncode == 0, run.stderr
    response = json.loads(run.stdout)
    assert response["text"] == response["details"]["labels"][0]["label"] and len(response["details"]["labels"]) == 2
    assert response["random_weights"] is True and response["image_size"] == [256, 256]
    assert response["bpp"] == pytest.approx(8 * response["bytes"] / 256**2)
    assert set(response["timings_ms"]) >= {"entropy_decode", "neck", "clip_tail", "backend", "server_total"}


def test_msgpack_and_multipart_give_the_same_answer(http, good):
    body = msgpack.packb({"bitstream": good, "prompt": PROMPT})
    a = http.post("/infer", content=body, headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    assert a.status_code == 200 and a.headers["content-type"] == "application/msgpack"
    b = http.post("/infer", files={"bitstream": ("x.cnk", good)}, data={"prompt": PROMPT})
    assert b.headers["content-type"] == "application/json"
    a, b = msgpack.unpackb(a.content), b.json()
    assert (a["text"], a["details"], a["bytes"]) == (b["text"], b["details"], b["bytes"])


def test_cli_errors_are_one_line(server):
    photo = str(sample_photo())
    one_line_error(edge("encode", photo, "--server", server, "--prompt", PROMPT, "--backend", "nope"), "400 unknown_backend")
    one_line_error(edge("encode", photo, "--server", server, "--prompt", PROMPT, key=None), "401 unauthorized")
    one_line_error(edge("encode", photo, "--server", server, "--prompt", ""), "422 empty_prompt")
    one_line_error(edge("encode", photo, "--server", f"http://127.0.0.1:{free_port()}", "--prompt", PROMPT), "cannot reach")
    one_line_error(edge("encode", photo, "--server", server), "--server needs --prompt")


def test_reconstruct_and_models(http, good):
    png = http.post("/reconstruct", content=good, headers={"Content-Type": "application/octet-stream"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    models = http.get("/v1/models").json()
    assert models["random_weights"] is True and models["codec"]["rates"] == {"1": 0.004, "2": 0.008, "3": 0.016, "4": 0.032}
    assert [b["name"] for b in models["backends"]] == ["clip-zero-shot"]
    assert http.get("/openapi.json").json()["paths"]["/infer"]["post"]["requestBody"]["content"].keys() == {
        "application/msgpack", "multipart/form-data"}
    assert http.get("/docs").status_code == 200


def reseal(data: bytes) -> bytes:
    """Recompute the CRC32 so a doctored container passes the checksum."""
    return data[:-4] + zlib.crc32(data[:-4]).to_bytes(4, "big")


def doctored(good: bytes, tiny) -> dict[str, bytes]:
    stream = Bitstream.from_bytes(good)
    foreign = EdgeEncoder(dataclasses.replace(tiny, seed=1)).encode_file(sample_photo()).data
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF  # inside the last stream
    return {
        "truncated": good[: len(good) // 2],
        "crc_mismatch": bytes(flipped),
        "corrupted": reseal(good[:-4] + b"\x00" + good[-4:]),
        "bad_magic": sample_photo().read_bytes()[:2000],  # a PNG, not a container
        "unsupported_version": reseal(good[:4] + b"\x09" + good[5:]),
        "unknown_codec": reseal(good[:5] + b"\x63" + good[6:]),
        "bad_rate": reseal(good[:6] + b"\x07" + good[7:]),
        "bad_size": dataclasses.replace(stream, image_size=(10**6, 10**6)).to_bytes(),
        "codec_mismatch": foreign,
    }


CONTAINER_STATUS = {"codec_mismatch": 409}


@pytest.mark.parametrize("fmt", ["msgpack", "multipart"])
def test_every_bad_bitstream_gets_its_code(http, good, tiny, fmt):
    for code, data in doctored(good, tiny).items():
        if fmt == "msgpack":
            r = http.post("/infer", content=msgpack.packb({"bitstream": data, "prompt": PROMPT}), headers={"Content-Type": "application/msgpack"})
        else:
            r = http.post("/infer", files={"bitstream": ("x.cnk", data)}, data={"prompt": PROMPT})
        assert (r.status_code, r.json()["error"]["code"]) == (CONTAINER_STATUS.get(code, 400), code), r.text
        assert "\n" not in r.json()["error"]["message"]


def test_every_bad_request_gets_its_code(http, good):
    def mp(**fields):
        return {"content": msgpack.packb({"bitstream": good, **fields}), "headers": {"Content-Type": "application/msgpack"}}

    cases = [
        (mp(prompt=PROMPT, backend="llava"), 400, "unknown_backend"),
        (mp(prompt=PROMPT, task="poetry"), 400, "unknown_task"),
        (mp(prompt=PROMPT, task="caption"), 400, "unsupported_task"),
        (mp(prompt=""), 422, "empty_prompt"),
        (mp(prompt="a, b, " + "x" * 500), 422, "prompt_too_long"),
        (mp(prompt="one label"), 422, "bad_prompt"),
        (mp(prompt=PROMPT, options={"top_k": 0}), 422, "invalid_request"),
        (mp(prompt=PROMPT, options={"beam": 3}), 422, "invalid_request"),
        (mp(), 422, "invalid_request"),
        ({"content": b"\xc1\xc1", "headers": {"Content-Type": "application/msgpack"}}, 400, "bad_request"),
        ({"content": msgpack.packb([1, 2]), "headers": {"Content-Type": "application/msgpack"}}, 400, "bad_request"),
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "unsupported_media_type"),
        ({"data": {"prompt": PROMPT}, "files": {"other": ("x", b"1")}}, 422, "invalid_request"),
        ({"data": {"prompt": PROMPT, "options": "{bad"}, "files": {"bitstream": ("x", good)}}, 422, "invalid_request"),
        ({"content": b"x" * (LIMIT + 1), "headers": {"Content-Type": "application/msgpack"}}, 413, "body_too_large"),
        ({"content": iter([b"x" * 4096] * (LIMIT // 4096 + 1)), "headers": {"Content-Type": "application/msgpack"}}, 413, "body_too_large"),
    ]
    for kwargs, status, code in cases:
        r = http.post("/infer", **kwargs)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (code, r.text)
    r = http.get("/nowhere")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = http.get("/infer")
    assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")


def test_errors_follow_the_accept_header(http):
    r = http.post("/infer", content=b"{}", headers={"Content-Type": "text/plain", "Accept": "application/msgpack"})
    assert r.status_code == 415 and msgpack.unpackb(r.content)["error"]["code"] == "unsupported_media_type"


def test_server_keeps_serving_after_bad_input(http, good, tiny):
    for data in doctored(good, tiny).values():
        http.post("/infer", files={"bitstream": ("x.cnk", data)}, data={"prompt": PROMPT})
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.post("/infer", files={"bitstream": ("x.cnk", good)}, data={"prompt": PROMPT})
    assert r.status_code == 200 and r.json()["text"] in ("cow", "horse", "beach")
