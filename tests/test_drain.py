"""A running gateway drops the queued request of a client that went away, and SIGTERM drains it: it
stops taking connections, answers every request it had admitted (queued or running), then exits
by the signal. A real ``comneck-server`` process, real sockets and real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from checkpoints import write_llava

from comneck.image import sample_photo
from comneck_edge import EdgeEncoder, GatewayClient, GatewayError
from comneck_server.demo import free_port


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


def wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def send_and_hang_up(port: int, data: bytes, admitted: float, url: str) -> None:
    """POST /infer on a raw socket, wait until the gateway admitted it, then close the socket."""
    built = httpx.Request("POST", f"http://127.0.0.1:{port}/infer", files={"bitstream": ("b.cnk", data)},
                          data={"prompt": "Describe the photo.", "options": json.dumps({"max_new_tokens": 30})})
    body = built.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in built.headers.items())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /infer HTTP/1.1\r\n{head}\r\n".encode() + body)
        wait_for(lambda: metric(url, "comneck_admitted_requests") == admitted)


def test_a_client_gone_is_dropped_then_sigterm_answers_every_admitted_request(tmp_path, tiny):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "comneck_server", "--preset", "tiny", "--port", str(port), "--log-level", "warning",
           "--backend", f"llava={write_llava(tmp_path / 'llava')}", "--max-batch", "2", "--max-wait-ms", "2000", "--max-queue", "8"]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        data = EdgeEncoder(tiny).encode_file(sample_photo()).data
        with GatewayClient(url) as client:
            client.wait_ready(300, is_alive=lambda: server.poll() is None)
            started = time.perf_counter()
            client.infer(data, "Describe the photo.", options={"max_new_tokens": 30})
            one = time.perf_counter() - started
        assert metric(url, "comneck_batch_items_count") == 1
        # a client that goes away while its request waits for a batch to fill: the request is dropped
        send_and_hang_up(port, data, 1, url)
        wait_for(lambda: metric(url, "comneck_admitted_requests") == 0)
        time.sleep(2.5)  # past the batch's longest wait
        assert metric(url, "comneck_batch_items_count") == 1  # the dropped request never ran
        outcomes: list[object] = []

        def ask() -> None:
            with GatewayClient(url, timeout=120) as client:
                try:
                    outcomes.append(client.infer(data, "Describe the photo.", options={"max_new_tokens": 30})["text"])
                except GatewayError as exc:
                    outcomes.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: metric(url, "comneck_admitted_requests") == 4)  # all four past their upload: queued or running
        server.send_signal(signal.SIGTERM)
        time.sleep(min(0.5, one / 2))
        with pytest.raises(httpx.TransportError):  # no new connection is taken
            httpx.get(f"{url}/healthz", timeout=2)
        for thread in threads:
            thread.join(120)
        # uvicorn re-raises the signal once it has shut down, so the exit is SIGTERM's, as supervisors expect
        assert server.wait(120) == -signal.SIGTERM
        assert len(outcomes) == 4 and all(isinstance(o, str) for o in outcomes), outcomes
    finally:
        if server.poll() is None:
            server.kill()
