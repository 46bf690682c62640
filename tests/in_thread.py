"""A gateway app under uvicorn in a thread on loopback, configured as ``comneck-server`` configures
uvicorn (``cli.uvicorn_options``): the HTTP tests drive it over raw sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from comneck_server.cli import uvicorn_options
from comneck_server.settings import ServerSettings


@contextmanager
def serving(app, settings: ServerSettings) -> Iterator[int]:
    """``app`` under uvicorn in a thread on ``settings``' host and port (give a free one), its logs
    reaching the ``logging`` module (and so caplog); yields the port."""
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings), log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield settings.port
    finally:
        server.should_exit = True
        thread.join(10)
