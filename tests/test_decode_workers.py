"""Decoding in supervised worker processes: the same latents as in process, and every way a worker
can end (killed idle, killed mid-request, killed while starting, again and again, crashing on a
stream, overrunning) costs at most that request; afterwards a valid request gets the same answer.

Workers are real processes and the kills real signals (``os.kill``); ``decode_worker_hooks`` lets a
test hold a start open, keep a request in the decoder or make it crash. Every wait ends within
``WAIT_S``, so a broken pool fails a test instead of hanging it."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import decode_worker_hooks
import pytest
import torch
from fastapi.testclient import TestClient

from comneck.errors import ComneckInputError, ErrorCode
from comneck.image import sample_photo
from comneck_edge import EdgeEncoder
from comneck_server.app import create_app
from comneck_server.decode_workers import DecodeWorkers, backoff_s, crashed, how_it_ended
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings

WAIT_S = 60.0  # a worker start takes seconds; this bounds every wait
SLOW_S = 0.3  # a steered worker's extra decoding time: long enough to be killed mid-request
MAX_FAILURES = 3
PROMPT = "Labels: cow, horse, beach"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str) -> T:
    """``condition()``'s first true value, polled; fails the test after ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def new_pid(pool: DecodeWorkers, seen: set[int]) -> int:
    """The first worker process of ``pool`` not in ``seen`` (started, ready or not)."""
    return wait_for(lambda: next((pid for pid in pool.pids() if pid not in seen), None), "a new worker process")


def in_decoder(control: Path, handled: set[Path]) -> int:
    """The pid of the next worker a request reaches (its ``decoding.PID`` marker not in ``handled``)."""
    marker = wait_for(lambda: next((m for m in control.glob("decoding.*") if m not in handled), None), "a request in a decoder")
    handled.add(marker)
    return int(marker.suffix[1:])


@pytest.fixture(scope="module")
def encoded(tiny):
    return EdgeEncoder(tiny).encode_file(sample_photo())


@pytest.fixture(scope="module")
def stream(encoded):
    return encoded.bitstream


@pytest.fixture(scope="module")
def expected(stream, tiny_models):
    """y_hat decoded in this process: what every worker must answer."""
    return tiny_models.codec.entropy_decode(stream.latents)


@pytest.fixture(scope="module")
def workers(tiny, tiny_models):
    pool = DecodeWorkers(tiny, {tiny_models.codec_fingerprint: None}, workers=1, timeout_s=WAIT_S)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> Path:
    """The steered workers' control folder (decode_worker_hooks), its gate open."""
    folder = tmp_path_factory.mktemp("decode-control")
    (folder / "gate").touch()
    return folder


@pytest.fixture(scope="module")
def steered(tiny, tiny_models, control):
    """A one-worker pool whose workers the tests steer through ``control``."""
    serve = partial(decode_worker_hooks.serve, control=control, slow_s=SLOW_S)
    pool = DecodeWorkers(tiny, {tiny_models.codec_fingerprint: None}, workers=1, timeout_s=WAIT_S, max_failures=MAX_FAILURES, serve=serve)
    yield pool
    pool.close()


def test_workers_decode_what_the_gateway_process_decodes(workers, stream, expected):
    assert torch.equal(workers.decode(stream), expected)
    cut = dataclasses.replace(stream, latents=type(stream.latents)([*stream.latents.strings[:-1], [b"\x00"]], (256, 256)))
    with pytest.raises(ComneckInputError) as info:
        workers.decode(cut)
    assert info.value.code == "corrupt_bitstream"  # refusals come back with their code


def test_a_worker_killed_while_idle_is_replaced_before_the_next_request(workers, stream, expected):
    (pid,) = workers.pids()
    os.kill(pid, signal.SIGKILL)
    replacement = new_pid(workers, {pid})  # started by its supervisor, not by a request
    assert torch.equal(workers.decode(stream), expected)
    assert workers.pids() == [replacement]


def test_an_overrun_is_refused_and_the_worker_replaced(workers, stream, expected):
    (pid,) = workers.pids()
    limit, workers.timeout_s = workers.timeout_s, 1e-4
    try:
        with pytest.raises(ComneckInputError) as info:
            workers.decode(stream)
    finally:
        workers.timeout_s = limit
    assert info.value.code == "decode_timeout"
    assert torch.equal(workers.decode(stream), expected) and pid not in workers.pids()


@pytest.mark.parametrize(
    "deaths, refusal",
    [
        (["kill"], None),  # SIGKILL from outside mid-request: the request goes to a fresh worker and is answered
        (["crash"], None),  # the decoder crashed once (SIGSEGV): the same
        (["kill", "kill"], ErrorCode.DECODE_UNAVAILABLE),  # killed again: retryable 503, nothing said about the stream
        (["crash", "kill"], ErrorCode.DECODE_UNAVAILABLE),  # one kill from outside clears the stream
        (["crash", "crash"], ErrorCode.CORRUPT_BITSTREAM),  # the stream crashed two decoders by their own fault: 400
    ],
)
def test_a_request_whose_worker_dies_is_tried_once_more(steered, control, stream, expected, deaths, refusal):
    for marker in control.glob("decoding.*"):
        marker.unlink()
    for i, death in enumerate(deaths):
        if death == "crash":
            (control / f"crash.{i}").touch()  # the i-th decode crashes in native code
    handled: set[Path] = set()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(steered.decode, stream)
        died = []
        for death in deaths:
            died.append(pid := in_decoder(control, handled))
            if death == "kill":
                os.kill(pid, signal.SIGKILL)
        if refusal is None:
            assert torch.equal(answer.result(timeout=WAIT_S), expected)
        else:
            with pytest.raises(ComneckInputError) as info:
                answer.result(timeout=WAIT_S)
    if refusal is None:
        (retried,) = {int(m.suffix[1:]) for m in control.glob("decoding.*")} - set(died)  # on another process
    else:
        assert info.value.code == refusal and refusal.status == (503 if refusal == "decode_unavailable" else 400)
        ends = {"kill": "killed by SIGKILL", "crash": "killed by SIGSEGV"}
        assert f"({ends[deaths[0]]} and {ends[deaths[1]]})" in str(info.value)
        assert getattr(info.value, "retry_after", None) == (2 if refusal == ErrorCode.DECODE_UNAVAILABLE else None)
    assert len(set(died)) == len(deaths) and not set(died) & set(steered.pids())
    assert not list(control.glob("crash.*"))
    assert torch.equal(steered.decode(stream), expected)  # and the next request is answered as before


def test_a_worker_killed_while_starting_is_started_again(steered, control, stream, expected):
    (pid,) = steered.pids()
    (control / "gate").unlink()  # starts from now on wait at the gate: before they report ready
    try:
        os.kill(pid, signal.SIGKILL)
        starting = new_pid(steered, {pid})
        os.kill(starting, signal.SIGKILL)
        new_pid(steered, {pid, starting})
    finally:
        (control / "gate").touch()
    assert torch.equal(steered.decode(stream), expected)


def test_failed_starts_in_a_row_turn_readiness_503_and_back(steered, control, encoded, tiny_pipeline, monkeypatch):
    """Kill every start MAX_FAILURES times in a row: each next start waits the backoff (0.1 s,
    doubling), then /readyz and /infer answer 503 decode_unavailable with Retry-After while /healthz
    stays 200 and no exception escapes; once a start succeeds, the same answer as before."""
    settings = ServerSettings(decode_worker_max_failures=MAX_FAILURES)
    monkeypatch.setattr(tiny_pipeline, "entropy_decode", steered.decode)
    gateway = Gateway(tiny_pipeline, settings, steered)
    request = {"files": {"bitstream": ("x.cnk", encoded.data)}, "data": {"prompt": PROMPT}}
    with TestClient(create_app(settings, gateway)) as client:
        before = client.post("/infer", **request).json()
        assert client.get("/readyz").status_code == 200
        (idle,) = seen = set(steered.pids())
        (control / "gate").unlink()
        try:
            os.kill(idle, signal.SIGKILL)  # a worker that had started: not a failed start
            seen.add(pid := new_pid(steered, seen))
            for failure in range(1, MAX_FAILURES + 1):
                assert client.get("/readyz").status_code == 200  # fewer than MAX_FAILURES failed starts so far
                os.kill(pid, signal.SIGKILL)  # before it reports ready: it waits at the gate
                killed = time.monotonic()
                seen.add(pid := new_pid(steered, seen))  # the next start, after the backoff
                assert time.monotonic() - killed >= 0.1 * 2 ** (failure - 1)
            ready = client.get("/readyz")  # the last failure was counted before the next start
            refused = client.post("/infer", **request)
            for answer in (ready, refused):
                assert answer.status_code == 503 and answer.headers["retry-after"] == "2", answer.text
                assert answer.json()["error"]["code"] == "decode_unavailable"
                assert f"{MAX_FAILURES} starts failed in a row" in answer.json()["error"]["message"]
            assert client.get("/healthz").status_code == 200
        finally:
            (control / "gate").touch()
        wait_for(lambda: client.get("/readyz").status_code == 200, "/readyz 200 again")
        after = client.post("/infer", **request).json()
    assert (after["text"], after["details"]) == (before["text"], before["details"])


def test_backoff_doubles_from_a_tenth_of_a_second_to_five():
    assert [backoff_s(n) for n in range(1, 9)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert backoff_s(10**6) == 5.0


@pytest.mark.parametrize(
    "exitcode, own_fault, words",
    [
        (-signal.SIGSEGV, True, "killed by SIGSEGV"),
        (-signal.SIGABRT, True, "killed by SIGABRT"),
        (1, True, "exited with code 1"),
        (-signal.SIGKILL, False, "killed by SIGKILL"),
        (-signal.SIGTERM, False, "killed by SIGTERM"),
        (None, False, "end not seen"),
    ],
)
def test_a_fault_of_its_own_is_told_from_a_kill_from_outside(exitcode, own_fault, words):
    assert (crashed(exitcode), how_it_ended(exitcode)) == (own_fault, words)


def test_a_worker_whose_codec_differs_stops_the_start(tiny):
    with pytest.raises(RuntimeError, match="differs from the gateway's"):
        DecodeWorkers(tiny, {bytes(8): None}, workers=1, max_failures=1)


def test_a_process_that_exits_without_closing_its_pool_stops_the_workers_quietly():
    """At interpreter exit the pool closes before multiprocessing stops its children: no supervisor
    takes their ends for deaths and starts new workers into the exiting interpreter."""
    script = ("from comneck.models import build_codec; from comneck.presets import PRESETS; "
              "from comneck_server.decode_workers import DecodeWorkers; "
              "tiny = PRESETS['tiny']; DecodeWorkers(tiny, {build_codec(tiny).fingerprint(): None})")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 0 and run.stderr == "", run.stderr
