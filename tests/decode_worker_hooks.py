"""Test-only decode-worker loops (``DecodeWorkers(serve=...)``) that a test steers through files in
a control folder, so it can kill a worker at a chosen point with a real signal:

- ``gate``: a worker reports ready only while this file exists (a test holds a start open);
- ``decoding.PID``: written by worker PID when a request reaches its decoder;
- ``crash.*``: each such file makes one decode crash in native code (a real SIGSEGV), as a
  stream that breaks the decoder would;
- ``slow_s``: every decode first sleeps this long (a request stays in the worker long enough
  to be killed there).

Everything else is the real worker loop on the real codec.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

from comneck.codec import LearnedCodec
from comneck_server import decode_workers


def serve(conn, preset, codecs, *, control: Path, slow_s: float = 0.0) -> None:
    """The real worker loop behind the control folder's gate, with decoding steered as above."""
    while not (control / "gate").exists():
        time.sleep(0.02)
    decode = LearnedCodec.entropy_decode

    def steered(codec, latents):
        (control / f"decoding.{os.getpid()}").touch()
        for crash in sorted(control.glob("crash.*")):
            try:
                crash.unlink()
            except FileNotFoundError:  # another worker took it
                continue
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        time.sleep(slow_s)
        return decode(codec, latents)

    LearnedCodec.entropy_decode = steered
    decode_workers._serve(conn, preset, codecs)
