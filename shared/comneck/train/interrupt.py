"""Ctrl-C during training: finish the step, save a checkpoint, then stop.

A KeyboardInterrupt raised in the middle of a step could leave the weights half updated, so the
first SIGINT only sets a flag that the loop reads between steps; a second one stops at once,
without saving. Data-loader workers ignore SIGINT (the terminal sends it to them too), so a
batch being loaded is not lost with them.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving the checkpoint of ``step`` (``checkpoint``: its
    folder, None in the processes of a DDP run that do not write it)."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """While entered (in the main thread), the first SIGINT sets ``requested`` instead of raising."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C stops at once

    def __enter__(self) -> "StopRequest":
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def ignore_sigint(worker_id: int) -> None:
    """``worker_init_fn`` of the data loader: only the main process answers Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
