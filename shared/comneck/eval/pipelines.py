"""Evaluation pipelines: one photo -> what the backend sees, at each rate point, and what it cost.

Every pipeline frames the item's photo for the codec (:func:`frame`: the run's resize policy, else
the backend's ``BackendSpec.resize``, else ``paper``), codes it at a rate point, and asks the
backend through :class:`comneck.pipeline.Pipeline`, the library path the gateway serves, one call
per batch (a few-shot episode is a call of its own: each brings its own support):

* ``comneck``: the edge encoder (:class:`comneck_edge.EdgeEncoder`, the point's weights folder)
  -> the container -> :meth:`Pipeline.answer` (neck + CLIP tail), or with a gateway URL
  :meth:`comneck_edge.GatewayClient.infer` per item over HTTP;
* ``reconstruction``: the same container -> entropy decoding -> g_s (:meth:`Pipeline.reconstruct`)
  -> the full CLIP (:meth:`Pipeline.answer_pixels`);
* ``postproc``: ... -> g_s -> the U-Net of a postproc training export -> the full CLIP;
* ``uncompressed``: the framed photo -> the full CLIP (raw 8-bit RGB: 24 bpp);
* ``jpeg``, ``webp``, ``avif``: the framed photo coded by Pillow at a quality -> decoded -> the full CLIP.

``bytes`` are what would cross the network (the container's or the file's real length, H x W x 3
for raw RGB); ``bpp`` = 8 x bytes / (H x W) of the codec input; ``edge_ms`` the time coding the
framed image took (analysis + entropy coding, or Pillow's encoder; framing is common to all and
not counted). A few-shot episode's support goes through the same pipeline and point as its query;
its bytes count the query only. Task ``human`` asks no backend: the outcome holds the decoded
image (``Outcome.reconstruction``), and :class:`~comneck.eval.metrics.HumanViewing` compares it
with the photo framed as :meth:`EvalPipeline.policy` says (``codec_frame(policy, preset.image_size)``).

The networks are loaded once per run: the caller's :class:`Pipeline` holds the CLIP and the
backends, and each rate point's codec and neck join them through :meth:`Pipeline.with_models`.
"""

from __future__ import annotations

import io
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, features

from ..backends import GenerationOptions
from ..bitstream import Source
from ..errors import ComneckInputError, ErrorCode
from ..image import load_image, resize_for_codec, to_tensor
from ..importers.fitting import fit
from ..importers.reading import read_weights
from ..models import WeightFiles, build_cloud_models, seeded
from ..pipeline import Pipeline, Support, per_item_options
from ..presets import Preset, get_preset, shares_tail
from ..unet import UNet
from ..weights_folder import part_file, read_manifest
from .items import Item, Outcome

#: The task that asks no backend: the decoded image is the answer (PSNR, MS-SSIM).
HUMAN = "human"
#: Pipelines a gateway can run (it takes containers; the full-CLIP baselines run in process).
SERVED = ("comneck",)


@dataclass(frozen=True)
class RatePoint:
    """One point of a pipeline's curve: a weights folder (``weights``, None: seeded random weights)
    and its rate index for the learned pipelines, a ``quality`` for Pillow's codecs, neither for
    the uncompressed image."""

    label: str
    rate: int | None = None
    weights: Path | None = None
    quality: int | None = None


@dataclass(frozen=True)
class Framed:
    """A photo as the codec sees it, and where it came from (for boxes in the photo's pixels)."""

    image: Image.Image
    source: Source


@dataclass
class Coded:
    """One framed photo through a pipeline's edge: what the cloud gets and what it cost."""

    size: tuple[int, int]  # the codec input (H, W)
    bytes: int
    edge_ms: float
    source: Source
    data: bytes | None = None  # a ComNeck container
    image: torch.Tensor | None = None  # the decoded codec-view image [1, 3, H, W] the full CLIP sees

    @property
    def bpp(self) -> float:
        return 8.0 * self.bytes / (self.size[0] * self.size[1])


@dataclass(frozen=True)
class Reply:
    """A backend's answer to one item, and whether that backend holds random weights."""

    text: str
    details: dict[str, Any]
    random_backend: bool


def per_item_choices(choices: Sequence[Sequence[str] | None] | None, items: int) -> list[Sequence[str] | None]:
    """A batch's multiple-choice options, one entry per item (None: free-form)."""
    return list(choices) if choices is not None else [None] * items


def frame(path: Path, policy: str, size: int) -> Framed:
    """The item's photo framed for the codec by ``policy`` at ``size`` (:func:`comneck.image.resize_for_codec`)."""
    photo = load_image(path)
    return Framed(resize_for_codec(photo, policy, size), Source((photo.height, photo.width), policy))  # type: ignore[arg-type]


class EvalPipeline(ABC):
    """One curve: its rate points, and :meth:`run` turning a batch of items into outcomes."""

    name: str
    #: the networks an answer runs through; a human-viewing outcome uses neither neck nor CLIP
    networks: tuple[str, ...]

    def __init__(self, base: Pipeline, points: Sequence[RatePoint], resize: str | None = None) -> None:
        self.base, self._points, self.resize = base, list(points), resize

    def points(self) -> list[RatePoint]:
        return list(self._points)

    def policy(self, backend: str | None, task: str | None) -> str:
        """How photos are framed: the run's resize, else the backend's (``BackendSpec.resize``), else ``paper``."""
        if self.resize or task == HUMAN:
            return self.resize or "paper"
        name, _ = self.base.resolve(task, backend)
        return self.base.specs[name].resize or "paper"

    def run(self, point: RatePoint, items: Sequence[Item], prompts: Sequence[str], choices: Sequence[Sequence[str] | None] | None = None,
            options: GenerationOptions | Sequence[GenerationOptions] | None = None, backend: str | None = None,
            task: str | None = None) -> list[Outcome]:
        """One batch at one rate point -> one :class:`Outcome` per item, in order."""
        policy = self.policy(backend, task)
        coded = [self.code(point, frame(item.image, policy, self.base.preset.image_size)) for item in items]
        views: list[torch.Tensor | None] = [None] * len(items)
        if task == HUMAN:
            replies = [Reply("", {}, False)] * len(items)
            views = [self.view(point, c) for c in coded]
        elif task == "fewshot":
            replies = [self.ask(point, [c], [prompt], [chosen], [opt], backend, task, self._support(point, item, policy))[0]
                       for c, item, prompt, chosen, opt in zip(coded, items, prompts, per_item_choices(choices, len(items)),
                                                               per_item_options(options, len(items)))]
        else:
            replies = self.ask(point, coded, prompts, choices, options, backend, task, None)
            views = [c.image for c in coded]
        used = {n for n in self.networks if task != HUMAN or n not in ("neck", "clip")}
        random = any(part.split()[0] in used for part in self.random_parts(point))
        return [Outcome(item.id, self.name, point.label, reply.text, reply.details, c.bytes, c.bpp, c.edge_ms,
                        random or reply.random_backend, view)
                for item, c, reply, view in zip(items, coded, replies, views)]

    def _support(self, point: RatePoint, item: Item, policy: str) -> tuple[list[Coded], list[str]]:
        """A few-shot episode's support images through this pipeline at ``point``, with their labels."""
        size = self.base.preset.image_size
        return [self.code(point, frame(s.image, policy, size)) for s in item.support], [s.label for s in item.support]

    @abstractmethod
    def code(self, point: RatePoint, framed: Framed) -> Coded:
        """The framed photo through the edge (and back to pixels where the cloud needs them)."""

    @abstractmethod
    def ask(self, point: RatePoint, coded: list[Coded], prompts: Sequence[str], choices: Sequence[Sequence[str] | None] | None,
            options: GenerationOptions | Sequence[GenerationOptions] | None, backend: str | None, task: str | None,
            support: tuple[list[Coded], list[str]] | None) -> list[Reply]:
        """The backend's answers to a coded batch (``support``: a few-shot episode's, coded the same way)."""

    @abstractmethod
    def view(self, point: RatePoint, coded: Coded) -> torch.Tensor:
        """The image a person would see: [1, 3, H, W] in [0, 1], the codec input's size."""

    @abstractmethod
    def random_parts(self, point: RatePoint) -> tuple[str, ...]:
        """The networks at ``point`` holding random weights (``codec``, ``neck``, ``clip ...``, ``unet``)."""


class PixelPipeline(EvalPipeline):
    """A pipeline whose cloud side is the full CLIP on decoded pixels (:meth:`Pipeline.answer_pixels`)."""

    def ask(self, point: RatePoint, coded: list[Coded], prompts: Sequence[str], choices: Sequence[Sequence[str] | None] | None,
            options: GenerationOptions | Sequence[GenerationOptions] | None, backend: str | None, task: str | None,
            support: tuple[list[Coded], list[str]] | None) -> list[Reply]:
        shown = Support(support[1], images=[c.image for c in support[0]]) if support else None  # type: ignore[misc]
        answers = self.base.answer_pixels([c.image for c in coded], prompts, backend, task, options, choices, shown,  # type: ignore[misc]
                                          [c.source for c in coded])
        return [Reply(a.text, a.details, self.base.backends[a.backend].random_weights) for a in answers]

    def view(self, point: RatePoint, coded: Coded) -> torch.Tensor:
        return coded.image  # type: ignore[return-value]

    def random_parts(self, point: RatePoint) -> tuple[str, ...]:
        return self.base.models.random_parts


class Uncompressed(PixelPipeline):
    """The framed photo itself, as raw 8-bit RGB (the upper bound)."""

    name, networks = "uncompressed", ("clip",)

    def code(self, point: RatePoint, framed: Framed) -> Coded:
        w, h = framed.image.size
        return Coded((h, w), h * w * 3, 0.0, framed.source, image=to_tensor(framed.image))


@dataclass(frozen=True)
class ImageCodec:
    """A Pillow image format: its name for ``Image.save``, its quality range and a default sweep."""

    format: str
    lowest: int
    highest: int
    qualities: tuple[int, ...]


#: Pillow's codecs with their quality ranges (Pillow's docs: JPEG 0-95, above 95 not advised, 0 coded
#: as 1; WebP and AVIF 0-100) and default sweeps chosen to span ComNeck's range (about 0.1-1 bpp at 256 px).
IMAGE_CODECS: dict[str, ImageCodec] = {
    "jpeg": ImageCodec("JPEG", 1, 95, (5, 10, 20, 35, 50, 75)),
    "webp": ImageCodec("WEBP", 0, 100, (1, 5, 15, 30, 50, 75)),
    "avif": ImageCodec("AVIF", 0, 100, (5, 15, 30, 45, 60, 75)),
}


def image_codec(name: str) -> ImageCodec:
    """A Pillow codec by name, refused in one line when unknown or missing from this Pillow (AVIF)."""
    if name not in IMAGE_CODECS:
        raise ComneckInputError(f"unknown image codec {name!r}; choose one of {', '.join(IMAGE_CODECS)}", ErrorCode.BAD_CONFIG)
    if name == "avif" and not features.check("avif"):
        raise ComneckInputError("pipeline avif: this Pillow has no AVIF codec (install a Pillow built with libavif)", ErrorCode.BAD_CONFIG)
    return IMAGE_CODECS[name]


def encode_image(image: Image.Image, codec: ImageCodec, quality: int) -> bytes:
    """``image`` coded by Pillow at ``quality`` with its defaults otherwise (JPEG: 4:2:0 chroma)."""
    buffer = io.BytesIO()
    image.save(buffer, format=codec.format, quality=quality)
    return buffer.getvalue()


def calibrate(name: str, images: Sequence[Image.Image], target_bpps: Sequence[float]) -> list[int]:
    """Per target bpp, the quality of codec ``name`` whose mean bpp over ``images`` (codec-view
    images: a few framed photos) is nearest: bisection over the integer quality range for the lowest
    quality reaching the target (bpp taken as non-decreasing in quality), then the nearer of it and
    the one below (ties: the lower). Targets outside the range get its ends; close targets may share
    a quality (a sweep keeps each once)."""
    codec = image_codec(name)
    if not images or any(not t > 0 for t in target_bpps):
        raise ComneckInputError("calibrate needs calibration images and positive target bpps", ErrorCode.BAD_CONFIG)
    known: dict[int, float] = {}

    def bpp(quality: int) -> float:
        if quality not in known:
            known[quality] = sum(8 * len(encode_image(im, codec, quality)) / (im.width * im.height) for im in images) / len(images)
        return known[quality]

    def nearest(target: float) -> int:
        lo, hi = codec.lowest, codec.highest
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if bpp(mid) < target else (lo, mid)
        return min((q for q in (lo - 1, lo) if q >= codec.lowest), key=lambda q: (abs(bpp(q) - target), q))

    return [nearest(t) for t in target_bpps]


class PillowPipeline(PixelPipeline):
    """The framed photo coded by a Pillow codec at the point's quality, then decoded."""

    networks = ("clip",)

    def __init__(self, name: str, base: Pipeline, points: Sequence[RatePoint], resize: str | None = None) -> None:
        super().__init__(base, points, resize)
        self.name, self.codec = name, image_codec(name)

    def code(self, point: RatePoint, framed: Framed) -> Coded:
        start = time.perf_counter()
        data = encode_image(framed.image, self.codec, point.quality)  # type: ignore[arg-type]
        edge_ms = (time.perf_counter() - start) * 1e3
        w, h = framed.image.size
        return Coded((h, w), len(data), edge_ms, framed.source, image=to_tensor(load_image(data)))


@dataclass
class PointNetworks:
    """One rate point's networks: codec and neck joined to the run's CLIP and backends, the edge
    encoder for a resize policy, and the U-Net where the pipeline has one."""

    pipeline: Pipeline
    encoder: Any  # comneck_edge.EdgeEncoder (imported where built: the edge package sits beside this one)
    unet: UNet | None = None
    unet_random: bool = False


class LatentPipeline(EvalPipeline):
    """A pipeline that codes with a learned codec at each rate point; the point's networks are built
    when a run first reaches the point and kept until it moves on to another. ``preset``: the
    weights' preset when its codec is not the run's (default: ``base``'s)."""

    def __init__(self, base: Pipeline, points: Sequence[RatePoint], resize: str | None = None, clip_weights: Path | None = None,
                 clip_final_norm: str | None = None, preset: Preset | None = None) -> None:
        super().__init__(base, points, resize)
        self.clip_weights, self.clip_final_norm = clip_weights, clip_final_norm
        self.preset = preset or base.preset
        self._held: tuple[tuple[str, str], PointNetworks] | None = None

    def at(self, point: RatePoint, policy: str) -> PointNetworks:
        """The networks of ``point`` framing by ``policy`` (built now, or the ones held)."""
        if self._held is None or self._held[0] != (point.label, policy):
            from comneck_edge import EdgeEncoder

            files = WeightFiles.bundle(point.weights, clip=self.clip_weights)
            models = build_cloud_models(self.preset, files, self.clip_final_norm)
            encoder = EdgeEncoder(self.preset, resize=policy, codec_weights=point.weights)  # type: ignore[arg-type]
            self._held = (point.label, policy), PointNetworks(self.base.with_models(models), encoder, *self.unet(point))
        return self._held[1]

    def unet(self, point: RatePoint) -> tuple[UNet | None, bool]:
        """The point's U-Net and whether it is random (None: this pipeline has none)."""
        return None, False

    def code(self, point: RatePoint, framed: Framed) -> Coded:
        encoded = self.at(point, framed.source.resize).encoder.encode_tensor(to_tensor(framed.image), framed.source)
        w, h = framed.image.size
        return Coded((h, w), len(encoded.data), encoded.timings_ms["analysis_entropy_coding"], framed.source, encoded.data)

    def random_parts(self, point: RatePoint) -> tuple[str, ...]:
        held = self._held[1]  # type: ignore[index]
        return (*held.pipeline.models.random_parts, *(("unet",) if held.unet_random else ()))


class Comneck(LatentPipeline):
    """ComNeck's path: the container to the neck and CLIP tail, in process or through a gateway."""

    name, networks = "comneck", ("codec", "neck", "clip")

    def __init__(self, *args: Any, server: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server = server

    def ask(self, point: RatePoint, coded: list[Coded], prompts: Sequence[str], choices: Sequence[Sequence[str] | None] | None,
            options: GenerationOptions | Sequence[GenerationOptions] | None, backend: str | None, task: str | None,
            support: tuple[list[Coded], list[str]] | None) -> list[Reply]:
        if self.server is not None:
            return self._over_http(coded, prompts, choices, options, backend, task, support)
        pipeline = self.at(point, coded[0].source.resize).pipeline
        shown = pipeline.support([c.data for c in support[0]], support[1]) if support else None  # type: ignore[misc]
        answers = pipeline.answer([c.data for c in coded], prompts, backend, task, options, choices, shown)  # type: ignore[misc]
        return [Reply(a.text, a.details, pipeline.backends[a.backend].random_weights) for a in answers]

    def _over_http(self, coded: list[Coded], prompts: Sequence[str], choices: Sequence[Sequence[str] | None] | None,
                   options: GenerationOptions | Sequence[GenerationOptions] | None, backend: str | None, task: str | None,
                   support: tuple[list[Coded], list[str]] | None) -> list[Reply]:
        """One POST /infer per item, with the item's options and its episode's support inline."""
        from comneck_edge import GatewayClient

        sent = [(c.data, label) for c, label in zip(*support)] if support else None
        replies = []
        with GatewayClient(self.server) as client:  # type: ignore[arg-type]
            for c, prompt, chosen, opt in zip(coded, prompts, per_item_choices(choices, len(coded)), per_item_options(options, len(coded))):
                answer = client.infer(c.data, prompt, task, backend, opt.model_dump(exclude_defaults=True),  # type: ignore[arg-type]
                                      choices=list(chosen) if chosen else None, support=sent)  # type: ignore[arg-type]
                replies.append(Reply(answer["text"], answer["details"], bool(answer["random_weights"])))
        return replies

    def view(self, point: RatePoint, coded: Coded) -> torch.Tensor:
        if self.server is not None:
            from comneck_edge import GatewayClient

            with GatewayClient(self.server) as client:
                return to_tensor(load_image(client.reconstruct(coded.data)))  # type: ignore[arg-type]
        return self.at(point, coded.source.resize).pipeline.reconstruct(coded.data)  # type: ignore[arg-type]


class Reconstruction(LatentPipeline, PixelPipeline):
    """The container decoded by g_s (then the U-Net, for ``postproc``), then the full CLIP."""

    name, networks = "reconstruction", ("codec", "clip")

    def code(self, point: RatePoint, framed: Framed) -> Coded:
        coded = super().code(point, framed)
        held = self.at(point, framed.source.resize)
        image = held.pipeline.reconstruct(coded.data)  # type: ignore[arg-type]
        if held.unet is not None:
            with torch.inference_mode():
                image = held.unet(image).clamp_(0, 1)
        coded.image = image
        return coded


class PostProcessing(Reconstruction):
    """g_s, then the U-Net of a postproc training export (``unet.safetensors`` of the point's folder)."""

    name, networks = "postproc", ("codec", "unet", "clip")

    def unet(self, point: RatePoint) -> tuple[UNet | None, bool]:
        preset = self.preset
        net = seeded(preset.seed + 3, UNet, 3, preset.unet_base)  # as the trainer builds it
        if point.weights is not None:
            fit(net, read_weights(part_file(point.weights, "unet"), "unet"), "unet")
        return net, point.weights is None  # type: ignore[return-value]


PIPELINES = ("comneck", "reconstruction", "postproc", "uncompressed", *IMAGE_CODECS)


def weight_points(weights_per_rate: Sequence[str | Path | None], preset: str) -> list[RatePoint]:
    """A rate point per weights folder (None: seeded random weights, label ``random``), labelled
    ``{scenario}-{rate}`` from its ``comneck.json`` (else the folder's name); a folder of another
    preset is refused (``bad_weights``)."""
    points = []
    for given in weights_per_rate:
        if given is None:
            points.append(RatePoint("random"))
            continue
        folder = Path(given)
        manifest = read_manifest(folder)
        if manifest.get("preset") != preset:
            raise ComneckInputError(f"{folder}: weights of preset {manifest.get('preset')!r}, but this run's preset is {preset!r}",
                                    ErrorCode.BAD_WEIGHTS)
        scenario, rate = manifest.get("scenario"), manifest.get("rate")
        points.append(RatePoint(f"{scenario}-{rate}" if scenario and rate else folder.name, rate, folder))
    return points


def build_pipeline(name: str, base: Pipeline, weights_per_rate: Sequence[str | Path | None] = (None,), *,
                   qualities: Sequence[int] | None = None, resize: str | None = None, server: str | None = None,
                   clip_weights: str | Path | None = None, clip_final_norm: str | None = None,
                   preset: str | None = None) -> EvalPipeline:
    """Pipeline ``name`` over the run's ``base`` pipeline (its preset, CLIP and backends: load
    them once, lazily where a gateway answers). ``weights_per_rate``: one weights folder per rate
    point (comneck, reconstruction, postproc; a postproc training export for postproc);
    ``qualities``: Pillow's qualities (default :data:`IMAGE_CODECS`' sweep, or :func:`calibrate`'s);
    ``resize``: the framing policy (default: the backend's); ``server``: a gateway URL (comneck only);
    ``clip_weights``: the CLIP weights ``base`` was built with (each point's networks must share them);
    ``preset``: the learned weights' preset, when its codec is not ``base``'s (it must share ``base``'s CLIP)."""
    if name not in PIPELINES:
        raise ComneckInputError(f"unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}", ErrorCode.BAD_CONFIG)
    if server is not None and name not in SERVED:
        raise ComneckInputError(f"pipeline {name} runs in process: a gateway takes containers, so only {', '.join(SERVED)} "
                                "goes through --server", ErrorCode.BAD_CONFIG)
    if name in IMAGE_CODECS:
        codec = image_codec(name)
        points = [RatePoint(f"q{q}", quality=q) for q in (qualities if qualities is not None else codec.qualities)]
        bad = [q for q in (p.quality for p in points) if not codec.lowest <= q <= codec.highest]  # type: ignore[operator]
        if bad:
            raise ComneckInputError(f"pipeline {name}: qualities {bad} outside {codec.lowest}..{codec.highest}", ErrorCode.BAD_CONFIG)
    else:
        points = [RatePoint("uncompressed")] if name == "uncompressed" else weight_points(weights_per_rate, preset or base.preset.name)
    labels = [p.label for p in points]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ComneckInputError(f"pipeline {name}: rate point {', '.join(twice)} is listed twice", ErrorCode.BAD_CONFIG)
    if name in IMAGE_CODECS:
        return PillowPipeline(name, base, points, resize)
    if name == "uncompressed":
        return Uncompressed(base, points, resize)
    clip = Path(clip_weights) if clip_weights is not None else None
    own = get_preset(preset) if preset is not None else None
    if own is not None and not shares_tail(own, base.preset):
        raise ComneckInputError(f"pipeline {name}: preset {preset} does not share preset {base.preset.name}'s CLIP and image size",
                                ErrorCode.BAD_CONFIG)
    if name == "comneck":
        return Comneck(base, points, resize, clip, clip_final_norm, own, server=server)
    return (Reconstruction if name == "reconstruction" else PostProcessing)(base, points, resize, clip, clip_final_norm, own)
