"""The gateway's work, apart from HTTP: bitstream + prompt -> backend answer, and g_s for viewing.

Models load once (:meth:`Gateway.load`); requests run one at a time under a lock, since
each already uses every core (CPU) or the whole stream (GPU).
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import torch

from comneck.backends import BACKENDS, TASKS, Backend, BackendAnswer, GenerationOptions, check_backend_names
from comneck.bitstream import Bitstream
from comneck.errors import ComneckInputError
from comneck.image import padding_of, to_image, unpad
from comneck.models import ComneckModels, build_cloud_models
from comneck.presets import RATE_LAMBDAS, get_preset

from .features import FeaturePipeline
from .settings import ServerSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class InferResult:
    """One answered request."""

    answer: BackendAnswer
    backend: str
    task: str
    num_bytes: int
    bpp: float
    image_size: tuple[int, int]
    rate: int
    timings_ms: dict[str, float]
    random_weights: bool
    note: str


def check_device(device: str) -> torch.device:
    """A torch device this machine has, or a one-line error."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ComneckInputError(f"unknown device {device!r}; use cpu, cuda or cuda:N", "bad_settings") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ComneckInputError(f"device {device} asked for, but this machine has no usable CUDA GPU", "bad_settings")
    if dev.type not in ("cpu", "cuda"):
        raise ComneckInputError(f"device {device}: only cpu and cuda are supported", "bad_settings")
    return dev


class Gateway:
    """Loaded models, backends and limits; thread-safe."""

    def __init__(self, models: ComneckModels, backends: dict[str, Backend], settings: ServerSettings) -> None:
        self.models = models
        self.backends = backends
        self.settings = settings
        self.pipeline = FeaturePipeline(models)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, settings: ServerSettings) -> "Gateway":
        """Build (or read) every network, move it to the device, load the backends, warm up."""
        preset = get_preset(settings.preset)
        names = check_backend_names(settings.backends)
        device = check_device(settings.device)
        models = build_cloud_models(preset, settings.weight_files).to(device, DTYPES[settings.dtype])
        gateway = cls(models, {name: BACKENDS[name](models) for name in names}, settings)
        gateway.warm_up()
        return gateway

    @property
    def default_backend(self) -> str:
        return next(iter(self.backends))

    def warm_up(self) -> None:
        """Run the pipeline once on a grey image so the first request pays no one-off costs."""
        side = self.models.preset.image_size
        latents, _ = self.models.codec.analyze(torch.full((1, 3, side, side), 0.5))
        codec = self.models.codec
        self.pipeline(Bitstream(codec.config.arch, codec.trained_rate or 1, self.models.codec_fingerprint, (side, side), latents))

    def _parse(self, data: bytes) -> Bitstream:
        stream = Bitstream.from_bytes(data, max_side=self.settings.max_image_side)
        stream.check_codec(self.models.codec.config.arch, self.models.codec_fingerprint)
        return stream

    def _check_request(self, prompt: str, task: str | None, backend: str | None) -> tuple[Backend, str]:
        if not prompt.strip():
            raise ComneckInputError("the prompt is empty", "empty_prompt")
        if len(prompt) > self.settings.max_prompt_chars:
            raise ComneckInputError(
                f"the prompt has {len(prompt)} characters; this gateway takes at most {self.settings.max_prompt_chars}",
                "prompt_too_long",
            )
        name = backend or self.default_backend
        if name not in self.backends:
            raise ComneckInputError(f"backend {name!r} is not loaded here; loaded: {', '.join(self.backends)}", "unknown_backend")
        chosen = self.backends[name]
        task = task or chosen.tasks[0]
        if task not in TASKS:
            raise ComneckInputError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}", "unknown_task")
        if task not in chosen.tasks:
            raise ComneckInputError(f"backend {name} does not do {task!r}; it does {', '.join(chosen.tasks)}", "unsupported_task")
        return chosen, task

    def infer(
        self, data: bytes, prompt: str, task: str | None = None, backend: str | None = None, options: GenerationOptions | None = None
    ) -> InferResult:
        """Check the request, decode the latents, run neck + CLIP tail once, ask the backend."""
        start = time.perf_counter()
        chosen, task = self._check_request(prompt, task, backend)
        stream = self._parse(data)
        self.pipeline.check_size(stream)
        parsed = time.perf_counter()
        with self._lock:
            queued = time.perf_counter()
            block = chosen.tap.block_index(self.models.clip.num_blocks)
            out = self.pipeline(stream, [block] if block is not None else [])
            t0 = time.perf_counter()
            answer = chosen.answer(chosen.tap.select(out.features, self.models.clip.num_blocks), prompt, task, options or GenerationOptions())
            backend_ms = (time.perf_counter() - t0) * 1e3
        timings = {"parse": (parsed - start) * 1e3, "queue": (queued - parsed) * 1e3, **out.timings_ms, "backend": backend_ms}
        timings["server_total"] = (time.perf_counter() - start) * 1e3
        h, w = stream.image_size
        return InferResult(
            answer, chosen.name, task, len(data), 8.0 * len(data) / (h * w), (h, w), stream.rate, timings,
            self.models.random_weights or chosen.random_weights, self.models.note,
        )

    def reconstruct(self, data: bytes) -> bytes:
        """g_s on the decoded latents, cropped to the original size, as PNG bytes (for people, not the MLLM)."""
        stream = self._parse(data)
        with self._lock, torch.inference_mode():
            x_hat = self.models.codec.synthesize(self.models.codec.entropy_decode(stream.latents))
        buffer = io.BytesIO()
        to_image(unpad(x_hat, padding_of(*stream.image_size))).save(buffer, format="PNG")
        return buffer.getvalue()

    def describe(self) -> dict:
        """What /v1/models reports: codec, rate points, networks, backends, random-weight status."""
        preset, info = self.models.preset, self.models.codec.weights_info
        return {
            "preset": preset.name,
            "codec": {
                "arch": self.models.codec.config.arch,
                "fingerprint": self.models.codec_fingerprint.hex(),
                "weights": {"layout": info.layout, "scenario": info.scenario, "rate": info.rate} if info else None,
                "rates": {str(k): v for k, v in RATE_LAMBDAS.items()},
                "input_size": [preset.image_size, preset.image_size],
            },
            "neck": {"width": preset.neck.width, "layers": preset.neck.layers, "tokens": preset.neck.grid**2 + 1},
            "clip": {"name": preset.clip.name, "blocks": self.models.clip.num_blocks, "enters_block": preset.split_block + 1},
            "backends": [
                {
                    "name": b.name,
                    "description": b.description,
                    "tasks": list(b.tasks),
                    "tap": b.tap.describe(),
                    "random_weights": self.models.random_weights or b.random_weights,
                }
                for b in self.backends.values()
            ],
            "device": self.settings.device,
            "dtype": self.settings.dtype,
            "random_weights": self.models.random_weights,
            "random_parts": list(self.models.random_parts),
            "note": self.models.note,
        }
