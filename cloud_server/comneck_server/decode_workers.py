"""Entropy decoding in worker processes, so that a fault in native decoding code costs one
request, not the gateway.

Each worker builds the gateway's codec itself (same preset and weights; its fingerprint is
checked) and decodes one container at a time. A worker that dies or overruns the decode time
limit is killed and replaced, and that request gets a coded 4xx; the others go on. Decoding
inside a worker is the same checked decoding (``comneck.safe_decoding``) as everywhere else:
the processes are the second line of defence, not the first.
"""

from __future__ import annotations

import multiprocessing
import queue
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comneck.codec import EncodedLatents
from comneck.errors import ComneckInputError, ErrorCode
from comneck.presets import Preset

_START_TIMEOUT_S = 300.0  # building the paper codec and reading its weights, on a loaded machine


def _serve(conn: Connection, preset: Preset, weights: Path | None, fingerprint: bytes) -> None:
    """A worker's loop: build the codec, then decode (strings, padded size, fixed point) -> y_hat
    until told to stop."""
    from comneck.models import build_codec

    codec = build_codec(preset, weights)
    if codec.fingerprint() != fingerprint:
        conn.send(("fatal", "the worker's codec differs from the gateway's (weights changed on disk?)"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the gateway went away
            return
        if request is None:
            return
        try:
            y_hat = codec.entropy_decode(EncodedLatents(*request))
            conn.send(("ok", y_hat.numpy()))
        except ComneckInputError as exc:
            conn.send(("refused", (str(exc.code), str(exc))))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection


class DecodeWorkers:
    """A pool of ``workers`` decoding processes behind :meth:`decode` (thread-safe)."""

    def __init__(self, preset: Preset, weights: Path | None, fingerprint: bytes, workers: int = 1, timeout_s: float = 30.0) -> None:
        self._context = multiprocessing.get_context("spawn")  # no forked copies of the gateway's threads and models
        self._args = (preset, weights, fingerprint)
        self.timeout_s = timeout_s
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        for worker in [self._start() for _ in range(workers)]:
            self._idle.put(self._ready(worker))

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, *self._args), name="comneck-decode", daemon=True)
        process.start()
        child.close()
        worker = _Worker(process, parent)
        self._all.append(worker)
        return worker

    def _ready(self, worker: _Worker) -> _Worker:
        """Wait for a started worker's codec; a worker that cannot build it stops the gateway's start."""
        if not worker.conn.poll(_START_TIMEOUT_S):
            self._kill(worker)
            raise RuntimeError(f"a decode worker did not start within {_START_TIMEOUT_S:.0f} s")
        status, message = worker.conn.recv()
        if status != "ready":
            self._kill(worker)
            raise RuntimeError(f"a decode worker failed: {message}")
        return worker

    def _kill(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(10)
        worker.conn.close()
        self._all.remove(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        self._kill(worker)
        return self._ready(self._start())

    def decode(self, latents: EncodedLatents) -> torch.Tensor:
        """y_hat of one container, decoded in a worker; a worker's crash or overrun answers a coded 4xx."""
        worker = self._idle.get()
        try:
            worker.conn.send((latents.strings, latents.padded_size, latents.fixed_point))
            if not worker.conn.poll(self.timeout_s):
                worker = self._replace(worker)
                raise ComneckInputError(f"decoding took longer than this gateway's {self.timeout_s:g} s limit", ErrorCode.DECODE_TIMEOUT)
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker = self._replace(worker)
            raise ComneckInputError("decoding this bitstream crashed a decoder process", ErrorCode.CORRUPT_BITSTREAM) from None
        finally:
            self._idle.put(worker)
        return _result(status, payload)

    def pids(self) -> list[int]:
        """Process ids of the workers (for operators and tests)."""
        return [worker.process.pid for worker in self._all if worker.process.pid is not None]

    def close(self) -> None:
        """Stop every worker."""
        for worker in list(self._all):
            try:
                worker.conn.send(None)
            except OSError:
                pass
            self._kill(worker)


def _result(status: str, payload: Any) -> torch.Tensor:
    if status == "refused":
        code, message = payload
        raise ComneckInputError(message, ErrorCode(code))
    return torch.from_numpy(np.asarray(payload))
