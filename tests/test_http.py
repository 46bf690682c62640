"""A real gateway (``comneck-server`` under uvicorn on 127.0.0.1) driven by the edge CLI (its
``main``, in this process) and by raw HTTP: round trips in msgpack and multipart, and every bad-input case; and the
in-process app under uvicorn on raw sockets, with short upload limits, for stalled, slow,
ambiguous and aborted uploads."""

import dataclasses
import json
import logging
import os
import select
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator

import httpx
import msgpack
import pytest

from comneck.bitstream import Bitstream
from comneck.image import sample_photo
from comneck_edge import EdgeEncoder
from comneck_edge.cli import main as edge_main
from comneck_server.app import create_app
from comneck_server.demo import free_port, local_gateway
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings
from cli_runner import run_main
from in_thread import serving

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
    return run_main(edge_main, *args, env=env)  # in this process (cli_runner says why)


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


def test_cli_choices_are_the_zero_shot_labels(server):
    run = edge("encode", str(sample_photo()), "--server", server, "--prompt", "What is it?", "--choice", "cow", "--choice", "beach",
               "--format", "multipart", "--json")
    assert run.returncode == 0, run.stderr
    assert {d["label"] for d in json.loads(run.stdout)["details"]["labels"]} == {"cow", "beach"}
    one_line_error(edge("encode", str(sample_photo()), "--server", server, "--prompt", "What?", "--choice", "cow"),
                   "422 bad_choices", "2 to 26 choices; got 1")


def test_a_json_body_with_base64_bitstreams_answers_as_msgpack_does(http, good):
    import base64

    as_json = http.post("/infer", json={"bitstream": base64.b64encode(good).decode(), "prompt": PROMPT, "options": {"top_k": 2}}).json()
    as_msgpack = msgpack.unpackb(http.post("/infer", content=msgpack.packb({"bitstream": good, "prompt": PROMPT, "options": {"top_k": 2}}),
                                           headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"}).content)
    assert (as_json["text"], as_json["details"], as_json["bytes"]) == (as_msgpack["text"], as_msgpack["details"], as_msgpack["bytes"])


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
    # a caption needs no prompt: the request goes out (and this gateway's labeller cannot caption)
    one_line_error(edge("encode", photo, "--server", server, "--task", "caption"), "400 unsupported_task")


def test_reconstruct_and_models(http, good):
    png = http.post("/reconstruct", content=good, headers={"Content-Type": "application/octet-stream"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    listed = http.get("/v1/models").json()
    assert listed["object"] == "list" and [(m["id"], m["object"], m["owned_by"]) for m in listed["data"]] == [
        ("clip-zero-shot", "model", "comneck")]
    models = listed["comneck"]
    assert models["random_weights"] is True and models["codec"]["rates"] == {"1": 0.004, "2": 0.008, "3": 0.016, "4": 0.032}
    assert [(b["name"], b["resize"], b["choices"], b["state"]) for b in models["backends"]] == [("clip-zero-shot", None, True, "loaded")]
    openapi = http.get("/openapi.json").json()
    assert openapi["paths"]["/infer"]["post"]["requestBody"]["content"].keys() == {
        "application/msgpack", "application/json", "multipart/form-data"}
    assert set(openapi["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    assert http.get("/").json()["docs"] == "/docs"
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = http.get(page).text  # no CDN: the pages load their scripts from the gateway itself
        assert f"/static-offline-docs/{asset}" in html and "cdn." not in html
        assert http.get(f"/static-offline-docs/{asset}").status_code == 200


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
        return raw_mp(msgpack.packb({"bitstream": good, **fields}))

    def raw_mp(body):
        return {"content": body, "headers": {"Content-Type": "application/msgpack"}}

    def form(**fields):
        return {"data": fields, "files": {"bitstream": ("x", good)}}

    latin_prompt = b"Labels: caf\xe9, th\xe9"  # latin-1 bytes, not UTF-8
    head = msgpack.packb({"bitstream": good})[1:]  # the bitstream entry of a map

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
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 422, "invalid_request"),
        ({"content": b"{bad", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ({"content": b"[]", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ({"content": json.dumps({"bitstream": "not base64!", "prompt": PROMPT}).encode(), "headers": {"Content-Type": "application/json"}},
         422, "invalid_request"),
        ({"content": b"[" * 300 + b"]" * 300, "headers": {"Content-Type": "application/json"}}, 422, "invalid_request"),
        ({"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"data": {"prompt": PROMPT}, "files": {"other": ("x", b"1")}}, 422, "invalid_request"),
        (form(prompt=PROMPT, options="{bad"), 422, "invalid_request"),
        (form(prompt=PROMPT, choices="[cow, horse]"), 422, "invalid_request"),
        (form(prompt=PROMPT, choices='"cow"'), 422, "invalid_request"),
        (mp(prompt=PROMPT, choices="cow, horse"), 422, "invalid_request"),
        (mp(prompt=PROMPT, choices=["cow", 3]), 422, "invalid_request"),
        (mp(prompt=PROMPT, choices=["cow"]), 422, "bad_choices"),
        (form(prompt=PROMPT, choices='["cow", ""]'), 422, "bad_choices"),
        (form(prompt=PROMPT, options="[" * 30_000 + "]" * 30_000), 422, "invalid_request"),
        (form(prompt=PROMPT, options="[" * 2048 + "]" * 2048), 422, "invalid_request"),  # as deep as 4096 characters go
        (form(prompt=latin_prompt), 422, "invalid_request"),
        (form(prompt=PROMPT, task=b"classif\xe9"), 422, "invalid_request"),
        (raw_mp(b"\x82" + head + msgpack.packb("prompt") + bytes([0xA0 + len(latin_prompt)]) + latin_prompt), 422, "invalid_request"),
        (raw_mp(b"\x83" + head + msgpack.packb("prompt") + msgpack.packb(PROMPT) + msgpack.packb("options") + b"\x91" * 30_000 + b"\xc0"),
         422, "invalid_request"),
        (mp(prompt=PROMPT, options={"top_k": [[]] * 60}), 422, "invalid_request"),
        ({"content": b"x" * (LIMIT + 1), "headers": {"Content-Type": "application/msgpack"}}, 413, "body_too_large"),
        ({"content": iter([b"x" * 4096] * (LIMIT // 4096 + 1)), "headers": {"Content-Type": "application/msgpack"}}, 413, "body_too_large"),
    ]
    for kwargs, status, code in cases:
        r = http.post("/infer", **kwargs)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (code, r.text)
    assert "not UTF-8" in http.post("/infer", **form(prompt=latin_prompt)).json()["error"]["message"]
    assert "maps or arrays" in http.post("/infer", **mp(prompt=PROMPT, options={"top_k": [[]] * 60})).json()["error"]["message"]
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


# -- uploads on raw sockets: the in-process app under uvicorn, with short limits ------------------------

GRACE_S, TIMEOUT_S, MIN_RATE = 1.5, 3.0, 1024


@pytest.fixture(scope="module")
def strict(tiny_pipeline) -> Iterator[int]:
    settings = ServerSettings(port=free_port(), body_timeout_s=TIMEOUT_S, upload_grace_s=GRACE_S, min_upload_bytes_per_s=MIN_RATE, max_queue=2)
    with serving(create_app(settings, Gateway(tiny_pipeline, settings)), settings) as port:
        yield port


def upload(port: int, headers: str, sent: bytes = b"") -> socket.socket:
    """A POST /infer whose headers and first ``sent`` bytes are on their way; the rest is up to the test."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S + 2)
    sock.sendall(f"POST /infer HTTP/1.1\r\nHost: gw\r\nContent-Type: application/msgpack\r\n{headers}\r\n".encode() + sent)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and error of the response, read until the server closes the connection (a socket
    timeout fails the test if it does not). A server that closes with our upload unread sends a
    reset after its answer; what came before the reset is the answer."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_stalled_uploads_hold_no_queue_slot_and_are_cut_off(strict, good):
    start = time.monotonic()
    stalled = [upload(strict, "Content-Length: 5000000\r\n", b"x" * 1024) for _ in range(4)]  # twice max_queue
    served = httpx.post(f"http://127.0.0.1:{strict}/infer", content=msgpack.packb({"bitstream": good, "prompt": PROMPT}),
                        headers={"Content-Type": "application/msgpack"}, timeout=10)
    assert served.status_code == 200, served.text
    assert select.select(stalled, [], [], 0)[0] == [], "served only after the stalled uploads were cut off"
    for sock in stalled:
        status, error = answer(sock)
        assert (status, error["code"]) == (408, "body_timeout") and f"slower than {MIN_RATE} bytes/s" in error["message"]
    assert GRACE_S + 1024 / MIN_RATE - 0.2 < time.monotonic() - start < TIMEOUT_S + 1


def test_a_trickle_over_the_minimum_rate_is_cut_off_at_the_body_timeout(strict):
    start = time.monotonic()
    sock = upload(strict, "Content-Length: 5000000\r\n")
    for _ in range(int(4 * (TIMEOUT_S + 1))):  # 8 KiB/s, well over the minimum rate, until the answer comes
        if select.select([sock], [], [], 0.25)[0]:
            break
        sock.sendall(b"x" * 2048)
    status, error = answer(sock)
    assert (status, error["code"]) == (408, "body_timeout") and f"not complete within {TIMEOUT_S:g} s" in error["message"]
    assert TIMEOUT_S - 0.2 < time.monotonic() - start < TIMEOUT_S + 1


def test_content_length_beside_chunked_is_refused_at_once(strict):
    start = time.monotonic()
    status, error = answer(upload(strict, "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"hello"))
    assert (status, error["code"]) == (400, "bad_request") and "Transfer-Encoding" in error["message"]
    assert time.monotonic() - start < 1


def test_an_aborted_upload_is_one_log_line_without_traceback(strict, caplog):
    caplog.set_level(logging.INFO)
    sock = upload(strict, "Content-Length: 5000\r\n", b"x" * 100)
    time.sleep(0.2)
    sock.close()
    deadline = time.monotonic() + 3
    while not any("disconnected" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert lines == ["client disconnected before its request body was in: POST /infer"], caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text


def test_a_folder_is_encoded_photo_by_photo_and_asked_with_jobs_in_flight(server, tmp_path, tiny, capsys, monkeypatch):
    """``comneck-edge encode DIR -o OUT --jobs 2``: one container per photo (the bytes a single encode
    writes), in the photos' order; outputs that exist are refused before any work; with --server each
    photo is asked. In process (the CLI's main), against the module's gateway."""
    from comneck_edge.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(sample_photo().parent.glob("*.png")):
        (photos / path.name).write_bytes(path.read_bytes())
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "out"
    assert main(["encode", str(photos), "-o", str(out), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    written = sorted(out.iterdir())
    assert [p.name for p in written] == sorted(f"{p.stem}.cnk" for p in photos.glob("*.png"))
    encoder = EdgeEncoder(tiny)
    assert all(p.read_bytes() == encoder.encode_file(photos / f"{p.stem}.png").data for p in written)
    assert [line.split(":")[0] for line in printed[:2]] == [str(p) for p in written] and printed[2].startswith("2 photos")
    before = {p: p.stat().st_mtime_ns for p in written}
    assert main(["encode", str(photos), "-o", str(out)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err and {p: p.stat().st_mtime_ns for p in written} == before
    assert main(["encode", str(tmp_path / "out"), "-o", str(tmp_path / "x")]) == 2  # .cnk files are no photos
    assert "holds no photos" in capsys.readouterr().err
    monkeypatch.setenv("COMNECK_API_KEY", API_KEY)
    assert main(["encode", str(photos), "--server", server, "--prompt", PROMPT, "--jobs", "2", "--json"]) == 0
    printed = capsys.readouterr().out
    assert printed.count('"backend": "clip-zero-shot"') == 2 and not (photos / "cow_beach.cnk").exists()
