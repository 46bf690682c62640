"""The gateway's work, apart from HTTP: the library pipeline (:mod:`comneck.pipeline`) behind
one model thread that batches requests (:mod:`comneck_server.batcher`), with the gateway's own
limits and its description for /v1/models.

Models load once (:meth:`Gateway.load`). A request is checked and parsed on its own thread, and
entropy-decoded there by the decode workers (other processes, so requests decode in parallel).
Then it queues for the model thread, which answers queued requests in dynamic batches: one neck +
CLIP-tail pass, one backend call per backend and task. All model work runs on that one thread:
model work from many request threads would give each its own glibc malloc arena, each keeping
freed memory, so the resident size would creep up with the number of threads that ever ran a
model (docs/benchmarks.md, "Memory"). Long jobs do not hold that thread for their whole length: a
support-set registration is described in pieces of ``SUPPORT_PIECE`` examples, each queued behind
the requests that came before it, and /reconstruct's g_s runs in a lane of its own.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar

import torch

from comneck.backends import GenerationOptions, SupportExample
from comneck.bitstream import Bitstream
from comneck.errors import ComneckInputError, ErrorCode
from comneck.image import to_image
from comneck.models import build_cloud_models, random_weights_note
from comneck.pipeline import Answer, Pipeline, Support
from comneck.presets import RATE_LAMBDAS
from comneck.provenance import WeightsInfo

from .batcher import Batcher, BatchInfo
from .decode_workers import DecodeWorkers
from .settings import ServerSettings
from .support_sets import SupportSet, check_name, open_store

T = TypeVar("T")
SUPPORT_PIECE = 8


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Ticket:
    """An admitted inference request: queued for (or in) a batch. :meth:`answer` waits for it;
    :meth:`cancel` drops it if it has not started (a client that went away)."""

    future: "Future[tuple[list[Answer], BatchInfo]]"
    start: float  # perf_counter at admission
    parsed: float
    deadline: float | None  # perf_counter time past which it answers deadline_exceeded

    def cancel(self) -> bool:
        return self.future.cancel()

    def answer(self, timeout_s: float | None = None) -> Answer:
        """The answer (raising the request's own error), waiting at most until the deadline (then
        ``deadline_exceeded``: dropped if it had not started) or ``timeout_s`` (then ``TimeoutError``)."""
        left = None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())
        wait = left if timeout_s is None else timeout_s if left is None else min(left, timeout_s)
        try:
            (answer,), batch = self.future.result(timeout=wait)
        except FutureTimeout:
            if left is not None and wait == left:
                dropped = self.future.cancel()
                raise ComneckInputError(
                    f"no answer within the gateway's request timeout ({self.deadline - self.start:.3g} s); "  # type: ignore[operator]
                    + ("it had not started and was dropped" if dropped else "it was running"), ErrorCode.DEADLINE_EXCEEDED) from None
            raise TimeoutError from None
        own = answer.timings_ms  # entropy_decode (and support_decode) first: they ran before the queue
        early = {k: own.pop(k) for k in ("entropy_decode", "support_decode") if k in own}
        answer.timings_ms = {"parse": (self.parsed - self.start) * 1e3, **early, "queue": batch.queued_ms,
                             "batch_size": float(batch.size), "batch_wait": batch.wait_ms, **own,
                             "server_total": (time.perf_counter() - self.start) * 1e3}
        return answer


class Gateway:
    """A loaded pipeline and the settings it serves under; thread-safe."""

    def __init__(self, pipeline: Pipeline, settings: ServerSettings, workers: DecodeWorkers | None = None) -> None:
        self.pipeline = pipeline
        self.models = pipeline.models
        self.settings = settings
        self.workers = workers
        self.support_sets = open_store(settings.support_store)
        self.started = int(time.time())  # "created" of the OpenAI-style model list
        #: the model thread: dynamic batches of requests, and exclusive jobs in order
        self.batcher = Batcher(pipeline.run_batch, settings.max_batch, settings.max_wait_ms / 1e3)
        #: /reconstruct's g_s (seconds on a large image) runs in a lane of its own, one at a time, so
        #: it never holds the model thread; the admission limit bounds what waits for it
        self._long_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comneck-long")
        #: support examples described per model-thread job: a registration of 64 holds inference up
        #: for one piece at a time, not for all of it
        self.support_piece = SUPPORT_PIECE

    def _on_model_thread(self, work: Callable[[], T]) -> tuple[T, float]:
        """Run ``work`` alone on the model thread after the requests before it; (its result, the
        perf_counter time it started)."""
        return self.batcher.call(work).result()

    @classmethod
    def load(cls, settings: ServerSettings) -> "Gateway":
        """Build (or read) every network, move it to the device, load the backends, warm up."""
        files = settings.weight_files
        pipeline = Pipeline.from_pretrained(
            preset=settings.preset, device=settings.device, dtype=settings.dtype, codec_weights=files.codec,
            neck_weights=files.neck, clip_weights=files.clip, backends=settings.backend_args, max_side=settings.max_image_side,
            lazy_backends=settings.lazy_backends, clip_final_norm=settings.clip_final_norm,
        )
        codecs = {pipeline.models.codec_fingerprint: files.codec}
        for point in settings.rate_point_files:
            models = build_cloud_models(pipeline.models.preset, point, settings.clip_final_norm, beside=pipeline.models)
            pipeline.add_rate_point(models)
            codecs[models.codec_fingerprint] = point.codec
        workers = None
        count = cores() if settings.decode_workers is None else settings.decode_workers
        if count:
            workers = DecodeWorkers(pipeline.preset, codecs, count, settings.decode_timeout_s, settings.decode_worker_max_failures)
            pipeline.entropy_decode = workers.decode
        gateway = cls(pipeline, settings, workers)
        gateway.warm_up()
        return gateway

    def close(self) -> None:
        """Stop the model thread (after the work it holds) and the decode workers (the process's
        exit stops them too)."""
        self.batcher.close()
        self._long_lane.shutdown()
        if self.workers is not None:
            self.workers.close()

    @property
    def backends(self) -> dict:
        return self.pipeline.backends

    @property
    def random_parts(self) -> tuple[str, ...]:
        """The networks that hold random weights in any rate point served (each answer says its own)."""
        return tuple(dict.fromkeys(part for models in self.pipeline.points.values() for part in models.random_parts))

    @property
    def random_weights(self) -> bool:
        return bool(self.random_parts)

    def warm_up(self) -> None:
        """Run decode, neck and CLIP tail once on a grey image, coded by every rate point, so the first
        request pays no one-off costs."""
        side = self.models.preset.image_size
        streams = []
        for fingerprint, models in self.pipeline.points.items():
            latents, _ = models.codec.analyze(torch.full((1, 3, side, side), 0.5))
            streams.append(Bitstream(models.codec.config.arch, models.codec.trained_rate or 1, fingerprint, (side, side), latents))
        taps = [backend.spec.tap for backend in self.backends.values()]
        codecs = [stream.fingerprint for stream in streams]
        self._on_model_thread(lambda: self.pipeline.features(self.pipeline.decode([self.pipeline.check(s) for s in streams]), taps,
                                                             codecs=codecs))

    def model_list(self) -> dict:
        """``GET /v1/models`` in OpenAI's list shape (``object: list``, one ``data`` entry per backend,
        its ``id`` the name a request's ``model`` or ``backend`` takes), ComNeck's own description under ``comneck``."""
        described = self.describe()
        data = [{"id": b["name"], "object": "model", "created": self.started, "owned_by": "comneck", "comneck": b}
                for b in described["backends"]]
        return {"object": "list", "data": data, "comneck": described}

    def _check_prompt_length(self, prompt: str, choices: Sequence[str]) -> None:
        """The prompt and its choices together within ``max_prompt_chars``."""
        chars = len(prompt) + sum(map(len, choices))
        if chars > self.settings.max_prompt_chars:
            what = "the prompt and its choices have" if choices else "the prompt has"
            raise ComneckInputError(f"{what} {chars} characters; this gateway takes at most {self.settings.max_prompt_chars}",
                                    ErrorCode.PROMPT_TOO_LONG)

    def infer(
        self, data: bytes, prompt: str, task: str | None = None, backend: str | None = None,
        options: GenerationOptions | None = None, choices: Sequence[str] | None = None,
        support_bitstreams: Sequence[bytes] | None = None, support_labels: Sequence[str] | None = None,
        support_set: str | None = None,
    ) -> Answer:
        """:meth:`admit` the request, then wait for its answer (at most until its deadline)."""
        return self.admit(data, prompt, task, backend, options, choices, support_bitstreams, support_labels, support_set).answer()

    def admit(
        self, data: bytes, prompt: str, task: str | None = None, backend: str | None = None,
        options: GenerationOptions | None = None, choices: Sequence[str] | None = None,
        support_bitstreams: Sequence[bytes] | None = None, support_labels: Sequence[str] | None = None,
        support_set: str | None = None,
    ) -> Ticket:
        """Check the request (cheap checks first) and entropy-decode it here (on the decode workers
        when there are any, else on the model thread with its batch), then queue it for a batch.
        Task ``fewshot`` takes labelled support: bitstreams with labels, or a registered ``support_set``."""
        start = time.perf_counter()
        timeout = self.settings.request_timeout_s
        self._check_prompt_length(prompt, choices or ())
        self._load_lazy(task, backend)
        support = self._support(task, backend, support_bitstreams, support_labels, support_set)
        request = self.pipeline.prepare([data], [prompt], task, backend, options, [choices], support)
        parsed = time.perf_counter()
        if self.workers is not None:
            self.pipeline.decode_request(request)
        return Ticket(self.batcher.submit(request), start, parsed, None if timeout is None else start + timeout)

    def _load_lazy(self, task: str | None, backend: str | None) -> None:
        """Load the backend a request names if it is lazy and not loaded yet, on the model thread
        (so no request runs beside the loading, and two requests load it once)."""
        name, _ = self.pipeline.resolve(task, backend)
        if name in self.pipeline.pending:
            self._on_model_thread(lambda: self.pipeline.backend_for(task, backend))

    def _support(self, task: str | None, backend: str | None, bitstreams: Sequence[bytes] | None,
                 labels: Sequence[str] | None, name: str | None) -> Support | None:
        """A request's support: a registered set's examples, or its own labelled bitstreams (checked, not decoded)."""
        if name is not None:
            if bitstreams or labels:
                raise ComneckInputError("send support_set or support_bitstreams with support_labels, not both", ErrorCode.BAD_SUPPORT)
            chosen, _ = self.pipeline.backend_for(task, backend)
            found = self.support_sets.get(name, chosen.spec.name)
            return Support([e.label for e in found.examples], examples=list(found.examples))
        if bitstreams is None and labels is None:
            return None
        return self.pipeline.support(bitstreams or [], labels or [])

    def register_support(self, name: str, bitstreams: Sequence[bytes], labels: Sequence[str], backend: str | None = None) -> SupportSet:
        """Describe labelled support bitstreams once, with ``backend`` (default: the first doing
        ``fewshot``), and keep them under ``name`` for later requests."""
        check_name(name)
        self._load_lazy("fewshot", backend)
        support = self.pipeline.support(bitstreams, labels)
        chosen = self.pipeline.check_support(support, backend)
        descriptions: list[str] = []
        for start in range(0, len(support.streams), self.support_piece):  # each piece queues behind what came before it
            piece = support.streams[start : start + self.support_piece]
            described, _ = self._on_model_thread(lambda: self.pipeline.describe_images(piece, chosen))
            descriptions += described
        examples = tuple(SupportExample(d, label) for d, label in zip(descriptions, support.labels))
        entry = SupportSet(name, chosen, examples)
        self.support_sets.put(entry)
        return entry

    def _check_pixels(self, data: bytes) -> Bitstream:
        """The parsed container, refused (``image_too_large``) if its image is over ``max_reconstruct_pixels``:
        the header says the size before any decoding, and g_s's work and memory grow with the area."""
        stream = Bitstream.from_bytes(data, max_side=self.pipeline.max_side)
        h, w = stream.image_size
        if h * w > self.settings.max_reconstruct_pixels:
            raise ComneckInputError(
                f"the bitstream holds a {w}x{h} image ({h * w} pixels); /reconstruct takes at most "
                f"{self.settings.max_reconstruct_pixels} pixels",
                ErrorCode.IMAGE_TOO_LARGE,
            )
        return stream

    def reconstruct(self, data: bytes) -> bytes:
        """g_s on the decoded latents, cropped to the original size, as PNG bytes (for people, not the MLLM)."""
        stream = self._check_pixels(data)
        x_hat = self._long_lane.submit(self.pipeline.reconstruct, stream).result()
        image = to_image(x_hat)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def describe(self) -> dict:
        """What /v1/models reports: codec, rate points, networks, backends, random-weight status."""
        preset, info = self.models.preset, self.models.codec.weights_info
        return {
            "preset": preset.name,
            "codec": {
                "arch": self.models.codec.config.arch,
                "fingerprint": self.models.codec_fingerprint.hex(),
                "weights": _weights(info),
                # every codec (and its neck) served: a container of any of them is answered
                "rate_points": [{"fingerprint": fp.hex(), "weights": _weights(m.codec.weights_info), "random_weights": m.random_weights}
                                for fp, m in self.pipeline.points.items()],
                "rates": {str(k): v for k, v in RATE_LAMBDAS.items()},
                "entropy_params": ["fixed-point", "float"],  # both decode; docs/bitstream.md
                "input_size": [preset.image_size, preset.image_size],
            },
            "neck": {"width": preset.neck.width, "layers": preset.neck.layers, "tokens": preset.neck.grid**2 + 1},
            "clip": {
                "name": preset.clip.name, "image_size": preset.clip.image_size, "blocks": self.models.clip.num_blocks,
                "enters_block": preset.split_block + 1,
                # ln_post once (standard CLIP) or twice (the official code's), and what the neck's weights record
                "final_norm": self.models.clip_final_norm, "final_norm_recorded": self.models.recorded_final_norm,
            },
            "backends": [
                {
                    "name": name,
                    "description": spec.description,
                    "tasks": list(spec.tasks),
                    "tap": spec.tap.describe(),
                    "clip": spec.clip.describe() if spec.clip else "the gateway's CLIP",
                    "example_prompt": spec.example_prompt,
                    "resize": spec.resize,  # the edge's --resize its weights expect (None: any)
                    "choices": spec.choices,  # it answers multiple-choice requests
                    "state": self.pipeline.state(name),  # loaded, lazy (loads on first use) or failed: why
                    "random_weights": self.models.random_weights or (self.backends[name].random_weights if name in self.backends
                                                                     else spec.random_init),
                }
                for name, spec in self.pipeline.specs.items()
            ],
            "device": self.settings.device,
            "dtype": self.settings.dtype,
            "random_weights": self.random_weights,
            "random_parts": list(self.random_parts),
            "note": random_weights_note(self.random_parts),
        }


def _weights(info: WeightsInfo | None) -> dict | None:
    """What a codec's weights say of themselves (None: seeded random)."""
    return {"layout": info.layout, "scenario": info.scenario, "rate": info.rate} if info else None
