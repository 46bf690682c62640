"""Run a command-line entry point's ``main`` in this process, as its console script would run it:
the exit status, stdout and stderr of one call, argparse's exits included.

A subprocess pays a fresh import of torch and CompressAI (7-10 s on the 2-core machine) for each
call; tests that check many refusals run them here instead. The entry points themselves run as
real processes in ``tests/test_edge_cli.py::test_every_cli_has_version_and_python_m``.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable, Mapping
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock


def run_main(main: Callable[[list[str]], int | None], *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """``main(args)`` with stdout and stderr captured and, if given, ``env`` as the whole environment;
    its result as :func:`subprocess.run` would give it (a ``SystemExit`` carries the status)."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env if env is not None else os.environ, clear=True), redirect_stdout(out), redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exit:  # argparse's refusals and --help, as the process would end
            status = exit.code if isinstance(exit.code, int) or exit.code is None else 1
            if isinstance(exit.code, str):
                print(exit.code, file=err)
    return subprocess.CompletedProcess(list(args), status or 0, out.getvalue(), err.getvalue())
