"""``comneck-demo``: the whole service once, on this machine.

Starts a gateway (``comneck-server``) on a free local port, encodes a photo on the "edge",
POSTs the bitstream and a prompt to /infer, prints the answer with bpp and the timing of
every step, and stops the gateway.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from comneck.version import __version__
from comneck.errors import run_command
from comneck.presets import PRESETS, RESIZE_POLICIES
from comneck_edge.client import GatewayClient

DEFAULT_PROMPT = "What is in the photo? Labels: cow, horse, dog, beach, city street"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_gateway(
    preset: str, *flags: str, env: dict[str, str] | None = None, timeout: float = 300.0
) -> Iterator[GatewayClient]:
    """Run ``comneck-server`` (with extra ``flags``) in a child process on a free port until the
    block ends; yield a client once it is ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "comneck_server", "--preset", preset, "--port", str(port), "--log-level", "warning", *flags]
    server = subprocess.Popen(cmd, env=env)
    try:
        with GatewayClient(f"http://127.0.0.1:{port}") as client:
            client.wait_ready(timeout, is_alive=lambda: server.poll() is None)
            yield client
    finally:
        stop_process(server)


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM ``process``, and SIGKILL it if it has not exited ``grace_s`` later."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()


def run_demo(image: str | None, preset: str, rate: int, resize: str, prompt: str) -> str:
    """Start a gateway, ask it about one photo, stop it; return the printed report."""
    from comneck.image import sample_photo  # here, not at the top: --help needs no torch
    from comneck_edge.encoder import EdgeEncoder
    from comneck_edge.report import format_answer

    path = image or str(sample_photo())
    encoder = EdgeEncoder(preset, rate=rate, resize=resize)  # type: ignore[arg-type]
    encoder.encode_file(path)  # warm-up: first calls pay one-off allocation costs
    encoded = encoder.encode_file(path)
    with local_gateway(preset) as client:
        start = time.perf_counter()
        response = client.infer(encoded.data, prompt)
        round_trip_ms = (time.perf_counter() - start) * 1e3
    header = [
        f"ComNeck demo: preset {preset}, gateway {client.url} (started and stopped by the demo)",
        f"photo        {path}",
        f"prompt       {prompt}",
    ]
    return "\n".join(header) + "\n" + format_answer(encoded, response, round_trip_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="comneck-demo",
        description="Start a local gateway, encode a photo on the edge side, send the bitstream and a prompt "
        "over HTTP, print the answer with bpp and timings, stop the gateway. With no --image it uses a photo "
        "bundled with the package.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--image", help="photo to encode (default: the bundled cow_beach.png)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model sizes (default: tiny)")
    parser.add_argument("--rate", type=int, default=1, help="rate index 1..4 (lambda 0.004..0.032)")
    parser.add_argument("--resize", default="paper", choices=RESIZE_POLICIES, help="codec input policy")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="question for the backend (default: candidate labels)")
    args = parser.parse_args(argv)
    return run_command("comneck-demo", lambda: run_demo(args.image, args.preset, args.rate, args.resize, args.prompt))


if __name__ == "__main__":
    sys.exit(main())
