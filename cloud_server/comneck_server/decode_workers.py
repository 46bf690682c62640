"""Entropy decoding in supervised worker processes, so that a fault in native decoding code costs
at most one request, never the gateway.

Each worker builds the gateway's codecs itself, one per rate point served (same preset and
weights; their fingerprints are checked), and decodes one container at a time with the codec
whose fingerprint the container carries. Decoding inside a worker is the same checked
decoding (``comneck.safe_decoding``) as everywhere else: the processes are the second line of
defence, not the first.

Supervision (docs/api.md, docs/deploy.md):

- One thread per worker slot starts a worker, waits for it to end however it ends (a crash, a
  kill from outside, the overrun limit) and starts the next. A start that fails (the process
  dies, reports an error or is not ready in time) is tried again after 0.1 s, doubling to 5 s.
- A request whose worker dies is sent once more, to another worker or a fresh one. If that one
  dies too, the answer is 400 ``corrupt_bitstream`` when both ended by their own fault (a fault
  signal or a non-zero exit: the stream's doing), else 503 ``decode_unavailable``: a worker
  killed from outside (SIGKILL, SIGTERM) says nothing about the stream, and a retry can succeed.
- After ``max_failures`` failed starts in a row the pool is failing: :meth:`DecodeWorkers.check`
  (``/readyz``) and requests that find no worker answer 503 ``decode_unavailable`` until a start
  succeeds. Only failed starts count: no request can cause one, so no client can take a gateway
  out of rotation by sending streams that crash workers.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comneck.bitstream import Bitstream
from comneck.codec import EncodedLatents
from comneck.errors import ComneckInputError, ErrorCode
from comneck.presets import Preset

from .errors import ApiError

log = logging.getLogger("comneck.server")

_START_TIMEOUT_S = 300.0  # building the paper codec and reading its weights, on a loaded machine
_FIRST_BACKOFF_S, _MAX_BACKOFF_S = 0.1, 5.0
_RETRY_AFTER_S = 2  # what a refused client waits: about one worker start
_REAP_S = 10.0  # how long a request waits for its dead worker's exit status
#: how a process ends when its own code fails: native faults and abort() (glibc's heap checks)
_FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS})

#: the codecs a worker builds: their weights (None: seeded) by the fingerprint the gateway's copy has
Codecs = Mapping[bytes, Path | None]
#: a worker's loop: (connection, preset, codecs) -> None
Serve = Callable[[Connection, Preset, Codecs], None]


def _serve(conn: Connection, preset: Preset, codecs: Codecs) -> None:
    """A worker's loop: build the codecs, then decode (fingerprint, strings, padded size, fixed
    point) -> y_hat until told to stop."""
    from comneck.models import build_codec

    built = {}
    for fingerprint, weights in codecs.items():
        codec = build_codec(preset, weights)
        if codec.fingerprint() != fingerprint:
            conn.send(("fatal", f"the worker's codec from {weights or 'seeded weights'} differs from the gateway's (weights changed on disk?)"))
            return
        built[fingerprint] = codec
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the gateway went away
            return
        if request is None:
            return
        try:
            fingerprint, *latents = request
            y_hat = built[fingerprint].entropy_decode(EncodedLatents(*latents))
            conn.send(("ok", y_hat.numpy()))
        except ComneckInputError as exc:
            conn.send(("refused", (str(exc.code), str(exc))))


def backoff_s(failures: int) -> float:
    """Seconds to wait before the next start after ``failures`` failed starts in a row: 0.1 s,
    doubling, at most 5 s (bounded, so a pool whose starts fail keeps trying)."""
    return min(_FIRST_BACKOFF_S * 2 ** min(failures - 1, 16), _MAX_BACKOFF_S)


def crashed(exitcode: int | None) -> bool:
    """Whether a process ended by its own fault (a fault signal, or a non-zero exit: Python could
    not go on) rather than stopped from outside (SIGKILL: an operator, the OOM killer, the overrun
    limit; SIGTERM, ...) or not yet reaped (None)."""
    return exitcode is not None and (exitcode > 0 or -exitcode in _FAULT_SIGNALS)


def how_it_ended(exitcode: int | None) -> str:
    """A process's end in words: "killed by SIGSEGV", "exited with code 1"."""
    if exitcode is None:
        return "end not seen"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        return f"killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"killed by signal {-exitcode}"


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    exitcode: int | None = None  # set by its supervisor once the process is reaped
    ended: threading.Event = field(default_factory=threading.Event)


class _WorkerDied(Exception):
    """The worker a request was in ended before answering."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(how_it_ended(exitcode))
        self.exitcode = exitcode


class DecodeWorkers:
    """A pool of ``workers`` supervised decoding processes behind :meth:`decode` (thread-safe)."""

    def __init__(self, preset: Preset, codecs: Codecs, workers: int = 1, timeout_s: float = 30.0,
                 max_failures: int = 5, serve: Serve = _serve) -> None:
        """Start the workers and wait until each is ready; RuntimeError (the gateway does not start)
        after ``max_failures`` failed starts in a row. ``codecs``: the weights of each rate point's
        codec by its fingerprint. ``serve`` is the workers' loop (tests put in one that decodes
        slowly, crashes on demand or holds its start)."""
        self._context = multiprocessing.get_context("spawn")  # no forked copies of the gateway's threads and models
        self._serve, self._args = serve, (preset, dict(codecs))
        self.timeout_s, self.max_failures = timeout_s, max_failures
        self._lock = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []  # started and not yet reaped, ready or not
        self._failures, self._last_failure = 0, ""
        self._closing = threading.Event()
        self._slots = [threading.Thread(target=self._run_slot, name="comneck-decode-supervisor", daemon=True) for _ in range(workers)]
        for slot in self._slots:
            slot.start()
        # before multiprocessing's own exit handler stops the workers (atexit runs the later first),
        # or their supervisors would start new ones while the interpreter exits
        atexit.register(self.close)
        with self._lock:
            self._lock.wait_for(lambda: len(self._idle) == workers or self.failing)
            failed, why = self.failing, self._last_failure
        if failed:
            self.close()
            raise RuntimeError(f"decode workers did not start ({max_failures} tries): {why}")

    @property
    def failing(self) -> bool:
        """``max_failures`` starts or more have failed in a row (and none has succeeded since)."""
        return self._failures >= self.max_failures

    # -- supervision: one thread per slot --------------------------------------------------
    def _run_slot(self) -> None:
        """One worker slot, for the pool's life: start a worker (again after a failed start, with
        backoff), wait for it to end however it ends, start the next."""
        while (worker := self._start_until_ready()) is not None:
            worker.process.join()  # this thread alone reaps the process
            self._ended(worker)

    def _start_until_ready(self) -> _Worker | None:
        """A ready worker (offered to requests), or None once the pool closes. Each failed start
        counts towards ``max_failures`` and is followed by :func:`backoff_s` of waiting."""
        while True:
            worker, failure = self._try_start()
            if worker is not None:
                return worker
            if self._closing.is_set():
                return None
            with self._lock:
                self._failures += 1
                self._last_failure = failure
                failures = self._failures
                self._lock.notify_all()
            log.warning("a decode worker failed to start (%d in a row; the pool fails at %d): %s", failures, self.max_failures, failure)
            if self._closing.wait(backoff_s(failures)):
                return None

    def _try_start(self) -> tuple[_Worker | None, str]:
        """Start one worker and wait for its codec: (the worker, "") or (None, why it failed)."""
        try:
            worker = self._spawn()
        except Exception as exc:  # no process could be started (process limits, memory): a failed start like any other
            return None, f"{type(exc).__name__}: {exc}"
        if worker is None:
            return None, "the pool is closing"
        try:
            if worker.conn.poll(_START_TIMEOUT_S):
                status, message = worker.conn.recv()
                if status == "ready":
                    with self._lock:
                        self._failures = 0
                        self._idle.append(worker)
                        self._lock.notify_all()
                    return worker, ""
                failure = str(message)
            else:
                failure = f"not ready within {_START_TIMEOUT_S:.0f} s"
        except (EOFError, OSError):
            failure = "ended while starting"
        return None, f"{failure} ({how_it_ended(self._reap_unready(worker))})"

    def _spawn(self) -> _Worker | None:
        """A started worker process (not ready yet), or None once the pool closes."""
        parent, child = self._context.Pipe()
        try:
            with self._lock:
                if self._closing.is_set():
                    parent.close()
                    return None
                process = self._context.Process(target=self._serve, args=(child, *self._args), name="comneck-decode", daemon=True)
                process.start()
                worker = _Worker(process, parent)
                self._all.append(worker)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        return worker

    def _reap_unready(self, worker: _Worker) -> int | None:
        """Kill and reap a worker that failed to start; its exit code."""
        worker.process.kill()
        worker.process.join()
        with self._lock:
            self._all.remove(worker)
        worker.conn.close()
        return worker.process.exitcode

    def _ended(self, worker: _Worker) -> None:
        """Forget a reaped worker. An idle one's connection is closed here; a request that holds
        the worker closes it itself."""
        with self._lock:
            worker.exitcode = worker.process.exitcode
            self._all.remove(worker)
            if worker in self._idle:
                self._idle.remove(worker)
                worker.conn.close()
            worker.ended.set()
        if not self._closing.is_set():
            log.warning("decode worker %s %s; starting another", worker.process.pid, how_it_ended(worker.exitcode))

    # -- requests ---------------------------------------------------------------------------
    def decode(self, stream: Bitstream) -> torch.Tensor:
        """y_hat of one checked container (its codec served here), decoded in a worker. A worker that
        dies mid-request costs a second try on another worker or a fresh one; then 400
        ``corrupt_bitstream`` if both died by their own fault, else 503 ``decode_unavailable``. An
        overrun answers 422 ``decode_timeout``."""
        latents = stream.latents
        request = (stream.fingerprint, latents.strings, latents.padded_size, latents.fixed_point)
        exits = []
        for _ in range(2):
            try:
                return _result(*self._ask(self._take(), request))
            except _WorkerDied as died:
                log.warning("decode worker %s mid-request%s", died, "; trying another" if not exits else "")
                exits.append(died.exitcode)
        how = " and ".join(map(how_it_ended, exits))
        if all(map(crashed, exits)):
            raise ComneckInputError(f"decoding this bitstream crashed two decoder processes in a row ({how})", ErrorCode.CORRUPT_BITSTREAM)
        raise ApiError(ErrorCode.DECODE_UNAVAILABLE, f"two decoder processes were stopped while decoding this bitstream ({how}), "
                       "not both by a fault of their own: retry", retry_after=_RETRY_AFTER_S)

    def _take(self) -> _Worker:
        """An idle worker, waiting up to ``timeout_s`` while workers start or are busy; 503
        ``decode_unavailable`` if none comes, and at once while the pool is failing or closed."""
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            while not self._idle:
                remaining = deadline - time.monotonic()
                if self.failing or self._closing.is_set() or remaining <= 0:
                    raise self._unavailable()
                self._lock.wait(remaining)
            return self._idle.pop()

    def _ask(self, worker: _Worker, request: tuple[Any, ...]) -> tuple[str, Any]:
        """Send ``request`` to a worker taken by :meth:`_take` and wait for the reply; the worker
        goes back to the idle list, or is killed (overrun) or found dead (:class:`_WorkerDied`)."""
        try:
            worker.conn.send(request)
            if not worker.conn.poll(self.timeout_s):
                self._drop(worker)
                raise ComneckInputError(f"decoding took longer than this gateway's {self.timeout_s:g} s limit", ErrorCode.DECODE_TIMEOUT)
            reply = worker.conn.recv()
        except (EOFError, OSError):
            raise _WorkerDied(self._drop(worker)) from None
        with self._lock:
            if worker.ended.is_set():  # it answered, then ended: its supervisor left the connection to us
                worker.conn.close()
            else:
                self._idle.append(worker)
                self._lock.notify_all()
        return reply

    def _drop(self, worker: _Worker) -> int | None:
        """Kill a worker a request holds (dead already, or overrunning), wait for its supervisor to
        reap it, and close its connection; its exit code (None if not reaped in time)."""
        worker.process.kill()  # after a reap, a no-op
        worker.ended.wait(_REAP_S)
        worker.conn.close()
        return worker.exitcode

    def _unavailable(self) -> ApiError:
        """503 ``decode_unavailable``, saying why no worker can take a request."""
        if self._closing.is_set():
            why = "the decode workers are stopped"
        elif self.failing:
            why = (f"no decode worker is running: {self._failures} starts failed in a row (last: {self._last_failure}); "
                   "the gateway keeps trying")
        else:
            why = f"no decode worker became free within {self.timeout_s:g} s (workers are restarting)"
        return ApiError(ErrorCode.DECODE_UNAVAILABLE, why, retry_after=_RETRY_AFTER_S)

    def check(self) -> None:
        """Raise 503 ``decode_unavailable`` while the pool is failing (for ``/readyz``)."""
        with self._lock:
            if self.failing:
                raise self._unavailable()

    def pids(self) -> list[int]:
        """Process ids of the workers, started or ready (for operators and tests)."""
        with self._lock:
            return [worker.process.pid for worker in self._all if worker.process.pid is not None]

    def close(self) -> None:
        """Stop every worker and its supervisor."""
        atexit.unregister(self.close)
        with self._lock:
            self._closing.set()
            self._lock.notify_all()
            workers = list(self._all)
        for worker in workers:
            worker.process.kill()
        for slot in self._slots:
            slot.join(_REAP_S)


def _result(status: str, payload: Any) -> torch.Tensor:
    if status == "refused":
        code, message = payload
        raise ComneckInputError(message, ErrorCode(code))
    return torch.from_numpy(np.asarray(payload))
