"""SIGTERM drains a running gateway: it stops taking connections, answers every request it had
admitted (queued or running), then exits by the signal. A real ``comneck-server`` process and real signals."""

from __future__ import annotations

import os
import signal
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


def test_sigterm_answers_every_admitted_request_then_exits(tmp_path, tiny):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "comneck_server", "--preset", "tiny", "--port", str(port), "--log-level", "warning",
           "--backend", f"llava={write_llava(tmp_path / 'llava')}", "--max-batch", "1", "--max-queue", "8"]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        data = EdgeEncoder(tiny).encode_file(sample_photo()).data
        with GatewayClient(url) as client:
            client.wait_ready(300, is_alive=lambda: server.poll() is None)
            started = time.perf_counter()
            client.infer(data, "Describe the photo.", options={"max_new_tokens": 30})
            one = time.perf_counter() - started
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
        admitted = 0.0
        deadline = time.monotonic() + 30
        while admitted < 4 and time.monotonic() < deadline:  # all four past their upload: queued or running
            metrics = httpx.get(f"{url}/metrics").text
            admitted = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("comneck_admitted_requests "))
            time.sleep(0.02)
        assert admitted == 4, "the four requests were not admitted in time"
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
