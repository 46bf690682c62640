"""The cloud path as a library: bitstream -> y_hat -> neck tokens -> CLIP tail -> backend -> answer.

Composed here once and used by the gateway and the benchmarks; the trainer's student and the
complexity report use its neck + tail composition (:func:`latent_features`). Each step is also
public, for callers that need one part:

* :meth:`Pipeline.parse` reads a container and runs the request's checks once (codec
  fingerprint, latent grid);
* :meth:`Pipeline.decode` entropy-decodes per item on the CPU in float32, where decoding
  repeats the edge's arithmetic exactly;
* :meth:`Pipeline.features` runs the neck and CLIP tail once for a whole batch on the device;
* :meth:`Pipeline.answer` does all of it and asks a backend, batched after decoding.

One pipeline may serve several rate points (:meth:`Pipeline.add_rate_point`): each container is
decoded by the codec whose fingerprint it carries and goes through that point's neck; the CLIP
tail and the backends are shared, and one batch may mix points.

The image is never reconstructed on this path (g_s runs only in :meth:`Pipeline.reconstruct`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import cast
from pathlib import Path

import torch
from torch import nn

from .backends import (TASKS, Backend, BackendAnswer, BackendSpec, FewShotBackend, GenerationOptions, ImageInfo, SupportExample, check_choices, check_support_labels,
                       check_backend, load_backend, parse_backend_arg)
from .backends.registry import BackendArg, check_options, get_spec
from .bitstream import DEFAULT_MAX_SIDE, Bitstream, BitstreamError, Source
from .clip_split import ClipFeatures, ClipSplit, ClipTap, clip_input
from .codec import LATENT_STRIDE
from .errors import ComneckInputError, ErrorCode
from .image import check_image_tensor, padding_of, unpad
from .models import ComneckModels, WeightFiles, build_cloud_models
from .presets import Preset, get_preset, shares_tail

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device(device: str | torch.device) -> torch.device:
    """A torch device this machine has, or a one-line error."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ComneckInputError(f"unknown device {device!r}; use cpu, cuda or cuda:N", ErrorCode.BAD_SETTINGS) from None
    if dev.type not in ("cpu", "cuda"):
        raise ComneckInputError(f"device {device}: only cpu and cuda are supported", ErrorCode.BAD_SETTINGS)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ComneckInputError(f"device {device} asked for, but this machine has no usable CUDA GPU", ErrorCode.BAD_SETTINGS)
    return dev


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype by name (float32, float16, bfloat16) or as itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ComneckInputError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}", ErrorCode.BAD_SETTINGS)
    return DTYPES[dtype]


@dataclass
class Support:
    """A few-shot request's labelled support: bitstreams the pipeline decodes and the backend
    describes (sent with the request), or examples already described (a registered support set)."""

    labels: list[str]
    streams: list[Bitstream] = field(default_factory=list)
    examples: list[SupportExample] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # codec-view images of a pixel request's support


def _few_shot(backend: Backend) -> FewShotBackend:
    """A backend whose spec lists task ``fewshot`` implements :class:`FewShotBackend` (the registry's contract)."""
    return cast(FewShotBackend, backend)


#: Tasks whose answers need no words of the user's: the backend's own prompt does (an empty prompt passes).
PROMPTLESS_TASKS = ("caption", "fewshot")


def per_item_options(options: GenerationOptions | Sequence[GenerationOptions] | None, items: int) -> list[GenerationOptions]:
    """A batch's decoding options, one per item: one ``GenerationOptions`` (None: the defaults)
    applies to every item; a sequence gives each item its own and must have one per item."""
    if options is None or isinstance(options, GenerationOptions):
        return [GenerationOptions() if options is None else options] * items
    if len(options) != items:
        raise ComneckInputError(f"give one GenerationOptions per prompt, or one for all (got {len(options)} for {items} prompts)",
                                ErrorCode.INVALID_REQUEST)
    return list(options)


@dataclass
class Request:
    """A batch that passed every cheap check: parsed containers, prompts (with their multiple-choice
    options, an empty list for a free-form item), the backend, task and each item's options."""

    streams: list[Bitstream]  # empty for a pixel request
    sizes: list[int]  # container bytes per item (0: a pixel request coded nothing)
    prompts: list[str]
    backend: Backend
    task: str
    options: list[GenerationOptions] = field(default_factory=list)  # one per item
    choices: list[list[str]] = field(default_factory=list)
    support: Support | None = None
    #: a pixel request's codec-view images [1, 3, H, W] in [0, 1], for the full CLIP (no container)
    pixels: list[torch.Tensor] = field(default_factory=list)
    sources: list[Source | None] = field(default_factory=list)  # the photos they were framed from
    #: latents decoded ahead of the model work (:meth:`Pipeline.decode_request`), with each item's time
    y_hats: list[torch.Tensor] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    support_y_hats: list[torch.Tensor] = field(default_factory=list)
    support_decode_ms: float | None = None

    def images(self) -> list[ImageInfo]:
        """What each item's image is: the container's record, or a pixel request's own size and source."""
        if self.pixels:
            return [ImageInfo((int(x.shape[-2]), int(x.shape[-1])), source) for x, source in zip(self.pixels, self.sources)]
        return [ImageInfo(stream.image_size, stream.source) for stream in self.streams]


@dataclass
class Answer:
    """One item's answer and what it cost."""

    text: str
    details: dict
    backend: str
    task: str
    num_bytes: int
    bpp: float
    image_size: tuple[int, int]
    rate: int
    random_weights: bool
    note: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # decode is per item; the rest per batch


def _merged(requests: Sequence[Request]) -> Request:
    """Requests of one backend and task (none few-shot) as one: their items in order."""
    first = requests[0]
    return Request([s for r in requests for s in r.streams], [n for r in requests for n in r.sizes],
                   [p for r in requests for p in r.prompts], first.backend, first.task,
                   [o for r in requests for o in r.options], [c for r in requests for c in r.choices])


class _Clock:
    """Wall time of steps, synchronising a CUDA device so kernels are timed, not their launches."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        """Milliseconds since the previous lap."""
        now = self._now()
        elapsed, self.last = (now - self.last) * 1e3, now
        return elapsed


def latent_features(neck: Callable[[torch.Tensor], torch.Tensor], clip: ClipSplit, y_hat: torch.Tensor, hidden_blocks: Iterable[int] = (),
                    timings: dict[str, float] | None = None) -> ClipFeatures:
    """y_hat -> neck tokens -> CLIP tail: the one composition of the cloud path's networks, used
    for serving (:meth:`Pipeline.features`) and training (the student). ``timings`` (if given)
    gets ``neck`` and ``clip_tail`` in ms."""
    if timings is None:  # no clock: timing synchronises a GPU, which training steps need not pay
        return clip.tail(neck(y_hat), hidden_blocks)
    clock = _Clock(y_hat.device)
    tokens = neck(y_hat)
    neck_ms = clock.lap()
    features = clip.tail(tokens, hidden_blocks)
    timings.update(neck=neck_ms, clip_tail=clock.lap())
    return features


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two networks are one, or hold the same tensors under the same names (compared on
    ``a``'s device in ``a``'s dtype, as a network moved and cast there would hold them)."""
    if a is b:
        return True
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(
        v.shape == theirs[k].shape and torch.equal(v, theirs[k].to(v.device, v.dtype)) for k, v in mine.items())


class Pipeline:
    """Loaded codec, neck, CLIP split and backends of one preset, on one device and dtype."""

    def __init__(self, models: ComneckModels, max_side: int = DEFAULT_MAX_SIDE) -> None:
        self.models = models
        self.max_side = max_side
        #: the rate points served, by codec fingerprint: ``models`` first (:meth:`add_rate_point`)
        self.points: dict[bytes, ComneckModels] = {models.codec_fingerprint: models}
        #: decodes one checked container's latents (checked decoding in this process, by the codec of
        #: its rate point; the gateway may put worker processes here so a fault in native code costs one request)
        self.entropy_decode: Callable[[Bitstream], torch.Tensor] = self._decode_here
        self.backends: dict[str, Backend] = {}
        #: backends registered lazily: checked at start-up, loaded by the first request that needs them
        self.pending: dict[str, BackendArg] = {}
        self._lazy_specs: dict[str, BackendSpec] = {}  # of every lazy backend, pending, loaded or failed
        self._order: list[str] = []  # names as added: the first is the default
        #: lazily loaded backends whose loading failed, with why (they stay unavailable)
        self.failed: dict[str, str] = {}
        param = next(models.neck.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def from_pretrained(
        cls,
        weights: str | Path | None = None,
        *,
        preset: str | Preset = "tiny",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        codec_weights: str | Path | None = None,
        neck_weights: str | Path | None = None,
        clip_weights: str | Path | None = None,
        backends: Iterable[str] = ("clip-zero-shot",),
        max_side: int = DEFAULT_MAX_SIDE,
        lazy_backends: bool = False,
        clip_final_norm: str | None = None,
    ) -> "Pipeline":
        """Build the preset's networks from the weight sources the server takes (a ``comneck convert``
        folder or training export, a release ``d1_1.pth.tar``, or one source per network; none:
        seeded random weights, which every answer then says) and load ``backends`` (``NAME`` or
        ``NAME=WEIGHTS[,KEY=PATH]``), or with ``lazy_backends`` check them and load each on first use.
        ``clip_final_norm`` (``once`` or ``twice``) overrides what the neck's weights record (a release
        checkpoint: ``twice``) and the preset's default (``once``)."""
        preset = get_preset(preset) if isinstance(preset, str) else preset
        specs = [parse_backend_arg(arg) for arg in backends]
        dev, dt = check_device(device), check_dtype(dtype)
        files = WeightFiles.bundle(*(Path(p) if p is not None else None for p in (weights, codec_weights, neck_weights, clip_weights)))
        pipeline = cls(build_cloud_models(preset, files, clip_final_norm).to(dev, dt), max_side)
        for name, backend_weights, options in specs:
            pipeline.add_backend(name, backend_weights, options, lazy=lazy_backends)
        return pipeline

    def with_models(self, models: ComneckModels) -> "Pipeline":
        """Another pipeline over ``models``' codec and neck (another rate point's weights) that shares
        this one's CLIP and backends (loaded, lazy and failed alike), so a run over many rate points
        loads its LLM once and keeps one CLIP on the device. ``models``' preset must share this one's CLIP
        and image size (the codec and the skipped blocks may differ: the ablations) and ``models`` must
        hold a CLIP of equal weights (refused in one line, ``bad_weights``); its own CLIP copy is dropped."""
        if not shares_tail(models.preset, self.preset):
            raise ComneckInputError(f"rate point weights are for preset {models.preset.name}, whose CLIP or image size is not this "
                                    f"pipeline's ({self.preset.name})", ErrorCode.BAD_WEIGHTS)
        for backend, spec in self.specs.items():
            block = spec.tap.block_index(models.clip.num_blocks)
            if block is not None and block <= models.preset.split_block:
                raise ComneckInputError(f"backend {backend} reads CLIP block {block}, which a neck skipping {models.preset.split_block} "
                                        "blocks replaces", ErrorCode.BAD_WEIGHTS)
        if not same_weights(self.models.clip_model, models.clip_model):
            raise ComneckInputError("the rate point's CLIP holds other weights than this pipeline's CLIP: build both from the same "
                                    "CLIP weights", ErrorCode.BAD_WEIGHTS)
        clip = self.models.clip_model
        split = ClipSplit(clip.visual, models.preset.split_block, models.clip_final_norm).eval()
        shared = replace(models, clip_model=clip, clip=split).to(self.device, self.dtype)
        other = Pipeline(shared, self.max_side)
        other.backends, other.pending, other._lazy_specs = self.backends, self.pending, self._lazy_specs
        other._order, other.failed = self._order, self.failed
        return other

    def add_rate_point(self, models: ComneckModels) -> None:
        """Serve another rate point's codec and neck beside this pipeline's: its containers are
        decoded by its codec and go through its neck, then through the CLIP tail and backends every
        point shares. ``models`` must be of this preset, skip as many CLIP blocks and run the same
        final norm over a CLIP of equal weights (``build_cloud_models(..., beside=)`` shares it), and
        hold codec weights not served yet; else refused in one line (``bad_weights``)."""
        fingerprint = models.codec_fingerprint
        problem = (
            f"they are for preset {models.preset.name}, this pipeline serves {self.preset.name}"
            if models.preset.name != self.preset.name else
            f"their neck skips {models.preset.split_block} CLIP blocks, this pipeline's {self.preset.split_block}"
            if models.preset.split_block != self.preset.split_block else
            f"their neck runs CLIP's final norm {models.clip_final_norm}, this pipeline's {self.models.clip_final_norm} "
            "(set it with clip_final_norm)" if models.clip_final_norm != self.models.clip_final_norm else
            "their CLIP holds other weights than this pipeline's: build both from the same CLIP weights"
            if not same_weights(self.models.clip_model, models.clip_model) else
            f"their codec weights ({fingerprint.hex()}) are served already" if fingerprint in self.points else None
        )
        if problem:
            raise ComneckInputError(f"cannot serve these rate point weights beside the others: {problem}", ErrorCode.BAD_WEIGHTS)
        self.points[fingerprint] = replace(models, clip_model=self.models.clip_model, clip=self.models.clip).to(self.device, self.dtype)

    @property
    def preset(self) -> Preset:
        return self.models.preset

    def add_backend(self, name: str, weights: str | Path | None = None, options: dict[str, str] | None = None,
                    lazy: bool = False) -> Backend | None:
        """Load a registered backend against this pipeline's CLIP (refused in one line if it does not
        fit); ``lazy``: only check it (files, packages, CLIP) and load it when a request first needs it."""
        if name in self.specs:
            raise ComneckInputError(f"backend {name} is loaded twice", ErrorCode.BAD_SETTINGS)
        check_options(get_spec(name), options or {}, f"backend {name}")
        arg = BackendArg(name, Path(weights) if weights is not None else None, dict(options or {}))
        if lazy:
            self._lazy_specs[name] = check_backend(name, weights, self.preset.clip, self.preset.split_block, options)
            self.pending[name] = arg
            self._order.append(name)
            return None
        backend = self._load(arg)
        self._order.append(name)
        return backend

    @property
    def specs(self) -> dict[str, BackendSpec]:
        """Every backend served, loaded, lazy or failed, in the order added (the first is the default)."""
        names = [*self._order, *(n for n in self.backends if n not in self._order)]
        return {n: self.backends[n].spec if n in self.backends else self._lazy_specs[n] for n in names}

    def state(self, name: str) -> str:
        """``loaded``, ``lazy`` (loads on its first request) or ``failed: why``; a loaded backend whose
        LLM engine is a server that keeps failing (vLLM's circuit breaker open) says ``loaded; why``."""
        if name in self.backends:
            unavailable = getattr(getattr(self.backends[name], "engine", None), "unavailable", lambda: None)()
            return f"loaded; {unavailable}" if unavailable else "loaded"
        return "lazy" if name in self.pending else f"failed: {self.failed[name]}"

    def load_pending(self, name: str) -> Backend:
        """Load lazy backend ``name`` now; a failure is kept (``load_failed`` for every later request)."""
        arg = self.pending[name]
        try:
            backend = self._load(arg)
        except Exception as exc:  # bad files found only now, out of memory, ...: the operator reads why
            self.failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            del self.pending[name]
            raise ComneckInputError(f"backend {name} failed to load: {self.failed[name]}", ErrorCode.LOAD_FAILED) from None
        del self.pending[name]
        return backend

    def _load(self, arg: BackendArg) -> Backend:
        """Load the backend ``arg`` names onto this pipeline's device and dtype."""
        backend = load_backend(
            arg.name, arg.weights, arg.options, clip_model=self.models.clip_model, clip_config=self.preset.clip,
            split_block=self.preset.split_block, clip_random=any(part.startswith("clip") for part in self.models.random_parts),
            device=self.device, dtype=self.dtype,
        )
        self.backends[arg.name] = backend
        return backend

    # -- the steps -------------------------------------------------------------------------
    def point(self, stream: Bitstream) -> ComneckModels:
        """The rate point whose codec coded ``stream``; ``codec_mismatch`` if none did."""
        found = self.points.get(stream.fingerprint)
        if found is None and len(self.points) > 1:
            served = ", ".join(f"{f'rate {m.codec.trained_rate}' if m.codec.trained_rate else 'seeded codec'} ({fp.hex()})"
                               for fp, m in self.points.items())
            raise BitstreamError(ErrorCode.CODEC_MISMATCH, f"bitstream codec weights {stream.fingerprint.hex()} are none of the "
                                 f"rate points served here: {served}")
        found = found or self.models
        stream.check_codec(found.preset.codec.arch, found.codec_fingerprint)
        return found

    def check(self, stream: Bitstream) -> Bitstream:
        """Refuse a container of a codec not served here (``codec_mismatch``) or a latent grid the
        neck was not built for (``unsupported_size``), before any decoding."""
        self.point(stream)
        side = self.preset.neck.grid * LATENT_STRIDE
        if stream.latents.padded_size != (side, side):
            h, w = stream.image_size
            ph, pw = stream.latents.padded_size
            raise ComneckInputError(
                f"this gateway's neck takes a {side}x{side} codec input; the bitstream holds {w}x{h} "
                f"(padded {pw}x{ph}): encode with --preset {self.preset.name} --resize paper",
                ErrorCode.UNSUPPORTED_SIZE,
            )
        return stream

    def parse(self, data: bytes) -> Bitstream:
        """Container bytes -> a checked :class:`Bitstream`."""
        return self.check(Bitstream.from_bytes(data, max_side=self.max_side))

    def decode(self, streams: Sequence[Bitstream]) -> list[torch.Tensor]:
        """Checked containers -> y_hat per item [1, M, h, w], entropy-decoded on the CPU in float32."""
        return [self.entropy_decode(stream) for stream in streams]

    def _decode_here(self, stream: Bitstream) -> torch.Tensor:
        return self.points[stream.fingerprint].codec.entropy_decode(stream.latents)

    @torch.inference_mode()
    def features(self, y_hats: Sequence[torch.Tensor], taps: Iterable[ClipTap] = (), timings: dict[str, float] | None = None,
                 codecs: Sequence[bytes] | None = None) -> ClipFeatures:
        """One neck + CLIP-tail pass over the batch on the pipeline's device, keeping the hidden
        blocks ``taps`` read; ``codecs``: the codec fingerprint of each item (each rate point's items
        go through its own neck; None: this pipeline's own); ``timings`` (if given) gets ``neck`` and
        ``clip_tail`` in ms."""
        blocks = {b for tap in taps if (b := tap.block_index(self.models.clip.num_blocks)) is not None}
        y = torch.cat(list(y_hats)).to(device=self.device, dtype=self.dtype)
        return latent_features(self._necks(codecs), self.models.clip, y, blocks, timings)

    def _necks(self, codecs: Sequence[bytes] | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The neck of a batch whose items came from ``codecs``: the one neck when they share a rate
        point, else one pass of each point's neck over its items, their tokens put back in order."""
        points = list(dict.fromkeys(codecs or [self.models.codec_fingerprint]))
        if len(points) == 1:
            return self.points[points[0]].neck

        def necks(y: torch.Tensor) -> torch.Tensor:
            tokens: torch.Tensor | None = None
            for fingerprint in points:
                rows = torch.tensor([i for i, c in enumerate(codecs or ()) if c == fingerprint], device=y.device)
                part = self.points[fingerprint].neck(y[rows])
                if tokens is None:
                    tokens = part.new_empty((y.shape[0], *part.shape[1:]))
                tokens[rows] = part
            return cast(torch.Tensor, tokens)

        return necks

    def select(self, features: ClipFeatures, tap: ClipTap) -> torch.Tensor:
        """What ``tap`` reads from the batch's features."""
        return tap.select(features, self.models.clip.num_blocks)

    # -- the whole path --------------------------------------------------------------------
    def resolve(self, task: str | None, backend: str | None) -> tuple[str, str]:
        """The backend (by name, loaded or lazy) and the task a request asks for (defaults: the first
        backend doing ``task``, else the first backend; its first task), without loading anything."""
        if not self.specs:
            raise ComneckInputError("no backend is loaded", ErrorCode.UNKNOWN_BACKEND)
        name = backend or next((n for n, spec in self.specs.items() if task in spec.tasks), next(iter(self.specs)))
        if name not in self.specs:
            raise ComneckInputError(f"backend {name!r} is not loaded here; loaded: {', '.join(self.specs)}", ErrorCode.UNKNOWN_BACKEND)
        spec = self.specs[name]
        task = task or spec.tasks[0]
        if task not in TASKS:
            raise ComneckInputError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}", ErrorCode.UNKNOWN_TASK)
        if task not in spec.tasks:
            raise ComneckInputError(f"backend {name} does not do {task!r}; it does {', '.join(spec.tasks)}", ErrorCode.UNSUPPORTED_TASK)
        return name, task

    def backend_for(self, task: str | None, backend: str | None) -> tuple[Backend, str]:
        """The backend and task :meth:`resolve` picks, loading a lazy backend now (``load_failed``
        if it could not load)."""
        name, task = self.resolve(task, backend)
        if name in self.failed:
            raise ComneckInputError(f"backend {name} failed to load: {self.failed[name]}", ErrorCode.LOAD_FAILED)
        return self.backends[name] if name in self.backends else self.load_pending(name), task

    def prepare(self, items: Sequence[bytes | Bitstream], prompts: Sequence[str], task: str | None = None,
                backend: str | None = None, options: GenerationOptions | Sequence[GenerationOptions] | None = None,
                choices: Sequence[Sequence[str] | None] | None = None, support: Support | None = None) -> Request:
        """Every check that needs no decoding, once per item: backend, task, prompts, choices and
        support labels first (cheapest), then each container. ``options``: one for every item, or
        one per item (:func:`per_item_options`); ``choices``: per item, the options of a
        multiple-choice question (None or empty: free-form), for backends whose spec takes them;
        ``support``: the labelled examples of task ``fewshot`` (:meth:`support`)."""
        if len(items) != len(prompts) or not items:
            raise ComneckInputError(f"give one prompt per bitstream (got {len(items)} bitstreams, {len(prompts)} prompts)")
        chosen, task, item_options, per_item = self._checked(prompts, task, backend, options, choices, support)
        streams = [self.parse(item) if isinstance(item, bytes) else self.check(item) for item in items]
        sizes = [len(item) if isinstance(item, bytes) else len(item.to_bytes()) for item in items]
        return Request(streams, sizes, list(prompts), chosen, task, item_options, per_item, support)

    def prepare_pixels(self, images: Sequence[torch.Tensor], prompts: Sequence[str], task: str | None = None,
                       backend: str | None = None, options: GenerationOptions | Sequence[GenerationOptions] | None = None,
                       choices: Sequence[Sequence[str] | None] | None = None, support: Support | None = None,
                       sources: Sequence[Source | None] | None = None) -> Request:
        """:meth:`prepare` for the full-CLIP path: codec-view images ([1, 3, H, W] in [0, 1]: the
        uncompressed photo as framed for the codec, a reconstruction, ...) instead of containers, with
        the photo each was framed from (``sources``: for boxes in the photo's pixels), same checks."""
        if len(images) != len(prompts) or not images:
            raise ComneckInputError(f"give one prompt per image (got {len(images)} images, {len(prompts)} prompts)")
        for image in [*images, *(support.images if support else [])]:
            check_image_tensor(image)
        chosen, task, item_options, per_item = self._checked(prompts, task, backend, options, choices, support)
        found = list(sources) if sources is not None else [None] * len(images)
        if len(found) != len(images):
            raise ComneckInputError(f"give one source per image (got {len(found)} for {len(images)} images)")
        return Request([], [0] * len(images), list(prompts), chosen, task, item_options, per_item, support, list(images), found)

    def _checked(self, prompts: Sequence[str], task: str | None, backend: str | None,
                 options: GenerationOptions | Sequence[GenerationOptions] | None, choices: Sequence[Sequence[str] | None] | None,
                 support: Support | None) -> tuple[Backend, str, list[GenerationOptions], list[list[str]]]:
        """The checks :meth:`prepare` runs before any container: (the backend, the task, each item's
        options, each item's choices)."""
        per_item = [list(c or ()) for c in choices] if choices is not None else [[] for _ in prompts]
        if len(per_item) != len(prompts):
            raise ComneckInputError(f"give one list of choices per prompt (got {len(per_item)} for {len(prompts)} prompts)")
        item_options = per_item_options(options, len(prompts))
        chosen, task = self.backend_for(task, backend)
        if task == "fewshot":
            if support is None:
                raise ComneckInputError("the fewshot task needs labelled support: support_bitstreams with support_labels, "
                                        "or a registered support_set", ErrorCode.BAD_SUPPORT)
            _few_shot(chosen).check_support(support.labels)
        elif support is not None:
            raise ComneckInputError(f"only the fewshot task takes support examples, not {task!r}", ErrorCode.BAD_SUPPORT)
        for prompt, offered, item in zip(prompts, per_item, item_options):
            if not prompt.strip() and task not in PROMPTLESS_TASKS:
                raise ComneckInputError("the prompt is empty", ErrorCode.EMPTY_PROMPT)
            if offered and not chosen.spec.choices:
                raise ComneckInputError(f"backend {chosen.spec.name} answers no multiple-choice questions: send no choices",
                                        ErrorCode.BAD_CHOICES)
            chosen.check_prompt(prompt, task, item, check_choices(offered) if offered else [])
        return chosen, task, item_options, per_item

    def support(self, items: Sequence[bytes | Bitstream], labels: Sequence[str]) -> Support:
        """Labelled support bitstreams, checked like queries (labels first: 2 classes at least, one per bitstream)."""
        labels = check_support_labels(labels, len(items))
        return Support(labels, [self.parse(item) if isinstance(item, bytes) else self.check(item) for item in items])

    def describe_support(self, support: Support, backend: str | None = None) -> list[SupportExample]:
        """What a few-shot backend shows of each support image, computed once (for a support set to keep)."""
        name = self.check_support(support, backend)
        return [SupportExample(d, label) for d, label in zip(self.describe_images(support.streams, name), support.labels)]

    def check_support(self, support: Support, backend: str | None = None) -> str:
        """The few-shot backend (by name) that would describe ``support``, its labels checked by it."""
        chosen, _ = self.backend_for("fewshot", backend)
        _few_shot(chosen).check_support(support.labels)
        return chosen.spec.name

    def describe_images(self, streams: Sequence[Bitstream], backend: str) -> list[str]:
        """Decode, one neck + tail pass and the few-shot backend's description of each image: the work
        of :meth:`describe_support`, for any slice of the support (the gateway runs long ones in pieces)."""
        chosen = self.backends[backend]
        features = self.features(self.decode(streams), [chosen.spec.tap], codecs=[s.fingerprint for s in streams])
        return _few_shot(chosen).describe(self.select(features, chosen.spec.tap))

    def decode_request(self, request: Request) -> Request:
        """Entropy-decode a container request's latents and its support's now, in the calling thread
        (the gateway does this on its decode workers, in parallel, before a request queues for the
        models); :meth:`run_batch` then uses them. Per-item times go in ``decode_ms``."""
        clock = _Clock(torch.device("cpu"))
        for stream in request.streams:
            request.y_hats.extend(self.decode([stream]))
            request.decode_ms.append(clock.lap())
        if request.support is not None and request.support.streams:
            request.support_y_hats = self.decode(request.support.streams)
            request.support_decode_ms = clock.lap()
        return request

    def run(self, request: Request) -> list[Answer]:
        """Decode, one batched neck + tail pass (the support images' included), the backend: a
        :class:`Request` -> one answer per item. A pixel request runs the full CLIP instead."""
        if not request.pixels:
            (outcome,) = self.run_batch([request])
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        timings: dict[str, float] = {}
        support, tap = request.support, request.backend.spec.tap
        features = self.pixel_features([*request.pixels, *(support.images if support else [])], [tap], timings)
        clock = _Clock(self.device)
        answers = self._backend_answers(request, self.select(features, tap))
        timings["backend"] = clock.lap()
        return [self._answer(request, i, answer, dict(timings)) for i, answer in enumerate(answers)]

    def run_batch(self, requests: Sequence[Request]) -> list[list[Answer] | Exception]:
        """Several container requests as one batch: their latents (decoded now unless
        :meth:`decode_request` did it) and their supports', one neck + CLIP-tail pass over all of
        them keeping every tap any of them reads, then each backend once per group of requests of
        the same backend and task (a few-shot request answers against its own support). Per request,
        its answers, or the error that failed it: a group whose backend raises is answered request by
        request, so only the requests that raise fail."""
        clock = _Clock(self.device)
        y_hats: list[torch.Tensor] = []
        codecs: list[bytes] = []  # per row: its rate point
        spans: list[tuple[int, int]] = []  # per request: where its rows, then its support's, are in the batch
        own: list[list[dict[str, float]]] = []
        support_ms: list[float | None] = []
        for request in requests:
            if not request.y_hats:
                self.decode_request(request)
            start = len(y_hats)
            y_hats += [*request.y_hats, *request.support_y_hats]
            codecs += [s.fingerprint for s in [*request.streams, *(request.support.streams if request.support is not None else [])]]
            spans.append((start, len(y_hats)))
            own.append([{"entropy_decode": ms} for ms in request.decode_ms])
            support_ms.append(request.support_decode_ms)
        clock.lap()
        shared: dict[str, float] = {}
        features = self.features(y_hats, {r.backend.spec.tap for r in requests}, shared, codecs)
        clock.lap()
        groups: dict[tuple[str, str, int], list[int]] = {}
        for index, request in enumerate(requests):  # few-shot requests each have their own episode
            key = (request.backend.spec.name, request.task, index if request.support is not None else -1)
            groups.setdefault(key, []).append(index)
        outcomes: list[list[Answer] | Exception] = [[] for _ in requests]
        for members in groups.values():
            tap = requests[members[0]].backend.spec.tap
            selected = self.select(features, tap)
            rows = [selected[slice(*spans[i])] for i in members]
            answered_all = self._group_answers([requests[i] for i in members], rows)
            backend_ms = clock.lap()
            for index, answered in zip(members, answered_all):
                if isinstance(answered, Exception):
                    outcomes[index] = answered
                    continue
                request = requests[index]
                extra = {"support_decode": support_ms[index]} if support_ms[index] is not None else {}
                outcomes[index] = [self._answer(request, i, answer, {**own[index][i], **extra, **shared, "backend": backend_ms})
                                   for i, answer in enumerate(answered)]
        return outcomes

    def _group_answers(self, requests: list[Request], rows: list[torch.Tensor]) -> list[list[BackendAnswer] | Exception]:
        """One backend call for requests of one backend and task (their items concatenated), or, if
        it raises, one call per request: each request's answers or its own error."""
        if len(requests) > 1:
            try:
                merged = self._backend_answers(_merged(requests), torch.cat(rows))
            except Exception:  # noqa: BLE001 - found again below, request by request
                pass
            else:
                counts = [len(r.prompts) for r in requests]
                return [merged[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(requests))]
        found: list[list[BackendAnswer] | Exception] = []
        for request, selected in zip(requests, rows):
            try:
                found.append(self._backend_answers(request, selected))
            except Exception as exc:  # noqa: BLE001 - the request's own failure, answered to it alone
                found.append(exc)
        return found

    def _backend_answers(self, request: Request, selected: torch.Tensor) -> list[BackendAnswer]:
        """The backend's answers to ``request`` from its selected features (its items', then its support's)."""
        queries, support = selected[: len(request.prompts)], request.support
        if support is None:
            return request.backend.generate(queries, request.prompts, request.task, request.options, request.images(), request.choices)
        few_shot = _few_shot(request.backend)
        described = support.examples or [
            SupportExample(d, label) for d, label in zip(few_shot.describe(selected[len(request.prompts):]), support.labels)
        ]
        return few_shot.fewshot(queries, described, request.options)

    @torch.inference_mode()
    def pixel_features(self, images: Sequence[torch.Tensor], taps: Iterable[ClipTap] = (),
                       timings: dict[str, float] | None = None) -> ClipFeatures:
        """The full CLIP (blocks 1..L) over codec-view images [1, 3, H, W] in [0, 1], resized to
        CLIP's input and normalised (:func:`~comneck.clip_split.clip_input`), in one batch on the
        pipeline's device: the reference path of the uncompressed image and of every baseline
        that reconstructs pixels. ``timings`` (if given) gets ``clip`` in ms."""
        clip = self.models.clip
        blocks = {b for tap in taps if (b := tap.block_index(clip.num_blocks)) is not None}
        clock = _Clock(self.device)
        x = torch.cat([clip_input(image.to(self.device, self.dtype), self.preset.clip.image_size) for image in images])
        features = clip.tail(clip.head(x), blocks)
        if timings is not None:
            timings["clip"] = clock.lap()
        return features

    def answer(self, items: Sequence[bytes | Bitstream], prompts: Sequence[str], backend: str | None = None,
               task: str | None = None, options: GenerationOptions | Sequence[GenerationOptions] | None = None,
               choices: Sequence[Sequence[str] | None] | None = None, support: Support | None = None) -> list[Answer]:
        """The whole path for a batch: containers (bytes or parsed) + prompts (+ choices, or support) -> answers;
        ``options`` are one for every item or one per item, and each item is answered as it would be alone."""
        return self.run(self.prepare(items, prompts, task, backend, options, choices, support))

    def answer_pixels(self, images: Sequence[torch.Tensor], prompts: Sequence[str], backend: str | None = None,
                      task: str | None = None, options: GenerationOptions | Sequence[GenerationOptions] | None = None,
                      choices: Sequence[Sequence[str] | None] | None = None, support: Support | None = None,
                      sources: Sequence[Source | None] | None = None) -> list[Answer]:
        """:meth:`answer` on the full-CLIP path: codec-view images instead of containers (their
        answers report 0 bytes: this path coded nothing, its caller knows what the image cost)."""
        return self.run(self.prepare_pixels(images, prompts, task, backend, options, choices, support, sources))

    def _answer(self, request: Request, i: int, answer: BackendAnswer, timings: dict[str, float]) -> Answer:
        image, expected = request.images()[i], request.backend.spec.resize
        if expected and image.source is not None and image.source.resize != expected:
            answer.details["resize_note"] = (f"{request.backend.spec.name} expects photos framed with --resize {expected}; "
                                             f"this one was framed with --resize {image.source.resize}")
        h, w = image.size
        rate = request.streams[i].rate if request.streams else 0
        models = self.points[request.streams[i].fingerprint] if request.streams else self.models
        return Answer(
            answer.text, answer.details, request.backend.spec.name, request.task, request.sizes[i], 8.0 * request.sizes[i] / (h * w),
            (h, w), rate, models.random_weights or request.backend.random_weights, models.note, timings,
        )

    @torch.inference_mode()
    def reconstruct(self, data: bytes | Bitstream) -> torch.Tensor:
        """g_s on the decoded latents, cropped to the original size: [1, 3, H, W] in [0, 1] (for people;
        the answer path never runs it). Any grid the codec can decode is accepted."""
        stream = Bitstream.from_bytes(data, max_side=self.max_side) if isinstance(data, bytes) else data
        x_hat = self.point(stream).codec.synthesize(self.decode([stream])[0])
        return unpad(x_hat, padding_of(*stream.image_size))
