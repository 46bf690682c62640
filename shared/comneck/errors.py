"""Errors that are the user's to fix, kept apart from programming errors.

Front ends (CLIs, the HTTP gateway) catch :class:`ComneckInputError` and show its
one-line message instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class ComneckInputError(ValueError):
    """Bad input from a user: a file that is no image, a tensor of the wrong shape, ...

    ``code`` is a short machine-readable name of the mistake (the HTTP gateway sends it).
    """

    def __init__(self, message: str, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.code = code


def run_command(prog: str, command: Callable[[], str]) -> int:
    """Run a CLI command: print its output and return 0, or print a user error on one line
    of stderr and return exit code 2."""
    try:
        output = command()
    except ComneckInputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(output)
    return 0
