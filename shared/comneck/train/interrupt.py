"""Ctrl-C or SIGTERM during training: finish the step, save a checkpoint, then stop.

A KeyboardInterrupt raised in the middle of a step could leave the weights half updated, so the
first SIGINT (Ctrl-C) or SIGTERM (``kill``, ``docker stop``, a scheduler's pre-emption) only sets
a flag that the loop reads between steps; a second one stops at once, without saving.

Under torchrun a Ctrl-C reaches each worker twice: from the terminal, then from torchrun, which
passes the signal on and kills the workers 30 s later. There a worker takes every signal as the
first, and torchrun's kill is the hard stop. Data-loader workers ignore SIGINT (the terminal sends
it to them too), so a batch being loaded is not lost with them.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on ``signum`` after saving the checkpoint of ``step`` (``checkpoint``: its
    folder, None in the processes of a DDP run that do not write it)."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class StopRequest:
    """While entered (in the main thread), the first SIGINT or SIGTERM sets ``signum`` instead of
    stopping the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        if not self._under_torchrun:
            self._restore()  # a second signal stops at once

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._restore()


def ignore_sigint(worker_id: int) -> None:
    """``worker_init_fn`` of the data loader: only the main process answers Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
