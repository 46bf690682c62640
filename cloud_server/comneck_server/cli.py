"""``comneck-server``: run the gateway with uvicorn.

Settings come from flags, then ``COMNECK_*`` environment variables, then defaults
(``comneck-server --help`` lists them). Mistakes in them end with one ``error:`` line and
exit code 2 before anything loads.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from comneck.version import __version__
from comneck.errors import ComneckInputError, ErrorCode
from comneck.presets import get_preset

from .settings import ServerSettings, read_settings


def check_port(host: str, port: int) -> None:
    """Refuse, before any model loads, an address this process cannot listen on (a port in use,
    a host that is not this machine's): uvicorn would find out only after minutes of loading."""
    if port == 0:  # any free port
        return
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ComneckInputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): is another server there? "
                                "pick another with --port", ErrorCode.BAD_SETTINGS) from None


def parse_settings(argv: list[str]) -> ServerSettings:
    """Settings from ``argv`` and the environment, checked as far as possible without loading models."""
    try:
        settings = read_settings(argv)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ComneckInputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}", ErrorCode.BAD_SETTINGS) from None
    except SettingsError as exc:
        raise ComneckInputError(str(exc).splitlines()[0], ErrorCode.BAD_SETTINGS) from None
    # only now: these checks import torch and the model code (seconds), which --help and a mistyped flag need not wait for
    from comneck.backends import check_backend, parse_backend_arg
    from comneck.importers.reading import check_source
    from comneck.pipeline import check_device

    preset = get_preset(settings.preset)
    backends = [parse_backend_arg(arg) for arg in settings.backend_args]
    if len({arg.name for arg in backends}) != len(backends):
        raise ComneckInputError(f"a backend is given twice: {', '.join(arg.name for arg in backends)}", ErrorCode.BAD_SETTINGS)
    for name, weights, options in backends:
        check_backend(name, weights, preset.clip, preset.split_block, options)
    check_device(settings.device)
    check_port(settings.host, settings.port)
    for part, path in vars(settings.weight_files).items():
        if path is not None:
            check_source(path, part)
    return settings


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """uvicorn's arguments from the settings: the address, the log level and the connection limits
    uvicorn itself enforces (keep-alive, open connections, header size); docs/deploy.md says which
    limits only a reverse proxy adds."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_connections,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:
        print(f"comneck-server {__version__}")
        return 0
    try:
        settings = parse_settings(args)
    except ComneckInputError as exc:
        print(f"comneck-server: error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(message)s")

    from .app import create_app

    uvicorn.run(create_app(settings), **uvicorn_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
