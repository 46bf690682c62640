"""comneck.eval.pipelines on the tiny preset (weights folders of perturbed random weights, the
bundled photos): each pipeline's bytes are the real container's or file's, its answers equal the
composition written out here from the library's steps, the same containers answer the same over
HTTP, few-shot support takes the query's path, calibrate() finds the nearest quality, and bad
configurations are refused in one line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from eval_fixtures import write_fewshot, write_image_folder, write_kodak
from in_thread import serving
from PIL import Image

from comneck.backends import BackendAnswer, BackendSpec, GenerationOptions
from comneck.clip_split import ClipTap
from comneck.errors import ComneckInputError, ErrorCode
from comneck.eval import pipelines
from comneck.eval.datasets import fewshot_episodes, image_folder, kodak
from comneck.eval.pipelines import IMAGE_CODECS, PIPELINES, build_pipeline, calibrate
from comneck.image import load_image, resize_for_codec, to_tensor
from comneck.models import WeightFiles, build_cloud_models, seeded
from comneck.pipeline import Pipeline
from comneck.unet import UNet
from comneck.weights_folder import write_folder
from comneck_edge import EdgeEncoder
from comneck_server.app import create_app
from comneck_server.demo import free_port
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings

PROMPT = "Labels: hen, cow, beach"
TAP = ClipTap("embedding", tokens="cls")
CODEC_VIEW = 256 * 256


def perturbed(*modules: torch.nn.Module, seed: int) -> None:
    """Noise on every weight, so no parameter keeps its init value (ones, zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    """Weights folders as training exports write them: d1 at rates 1 and 2, and a postproc export (with its U-Net)."""
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for name, scenario, rate in (("d1_1", "d1", 1), ("d1_2", "d1", 2), ("postproc_1", "postproc", 1)):
        models = build_cloud_models(tiny)
        perturbed(models.codec.model, models.neck, seed=rate)
        parts = {"codec": models.codec.model, "neck": models.neck}
        if scenario == "postproc":
            unet = seeded(tiny.seed + 3, UNet, 3, tiny.unet_base)
            perturbed(unet, seed=9)
            parts["unet"] = unet
        write_folder(root / name, "tiny", parts, {"scenario": scenario, "rate": rate})
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return image_folder(write_image_folder(tmp_path_factory.mktemp("folder")))[:2]


def reference(tiny, folder: Path) -> Pipeline:
    """A pipeline built on ``folder`` alone, beside its own clip-zero-shot."""
    pipeline = Pipeline(build_cloud_models(tiny, WeightFiles.bundle(folder)))
    pipeline.add_backend("clip-zero-shot")
    return pipeline


def container(tiny, folder: Path, photo: Path) -> bytes:
    """What the edge client sends for ``photo`` at the folder's rate point (its own framing: paper)."""
    return EdgeEncoder(tiny, codec_weights=folder).encode_file(photo).data


def pillow_file(photo: Path, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    resize_for_codec(load_image(photo), "paper", 256).save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def expected_pixels(ref: Pipeline, images: list[torch.Tensor]) -> list[BackendAnswer]:
    """clip-zero-shot on the full CLIP's pooled embedding of codec-view images."""
    backend = ref.backends["clip-zero-shot"]
    embedding = ref.select(ref.pixel_features(images, [TAP]), TAP)
    return backend.generate(embedding, [PROMPT] * len(images), "classify", [GenerationOptions()] * len(images))


def expected_answers(name: str, tiny, folders, items) -> tuple[list[int], list[BackendAnswer], list[torch.Tensor | None]]:
    """Per item: the bytes, the answer and the image the full CLIP saw, composed step by step."""
    photos = [item.image for item in items]
    if name in ("comneck", "reconstruction", "postproc"):
        folder = folders["postproc_1" if name == "postproc" else "d1_1"]
        ref, data = reference(tiny, folder), [container(tiny, folder, p) for p in photos]
        if name == "comneck":
            return [len(d) for d in data], ref.answer(data, [PROMPT] * len(data)), [None] * len(data)
        images = [ref.reconstruct(d) for d in data]
        if name == "postproc":
            unet = seeded(tiny.seed + 3, UNet, 3, tiny.unet_base)
            perturbed(unet, seed=9)
            with torch.inference_mode():
                images = [unet(x).clamp(0, 1) for x in images]
        return [len(d) for d in data], expected_pixels(ref, images), images
    ref = reference(tiny, folders["d1_1"])  # its CLIP is the run's (seeded)
    if name == "uncompressed":
        images = [to_tensor(resize_for_codec(load_image(p), "paper", 256)) for p in photos]
        return [CODEC_VIEW * 3] * len(photos), expected_pixels(ref, images), images
    files = [pillow_file(p, IMAGE_CODECS[name].format, 20) for p in photos]
    images = [to_tensor(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]
    return [len(f) for f in files], expected_pixels(ref, images), images


@pytest.mark.parametrize("name", PIPELINES)
def test_each_pipeline_answers_each_item_with_its_real_bytes_as_its_steps_composed_by_hand(name, tiny, tiny_pipeline, folders, items):
    weights = [folders["postproc_1" if name == "postproc" else "d1_1"]]
    pipeline = build_pipeline(name, tiny_pipeline, weights, qualities=[20])
    (point,) = pipeline.points()
    outcomes = pipeline.run(point, items, [PROMPT] * len(items), backend="clip-zero-shot", task="classify")
    sizes, answers, images = expected_answers(name, tiny, folders, items)
    assert [o.item_id for o in outcomes] == [item.id for item in items]
    assert {(o.pipeline, o.point) for o in outcomes} == {(name, "q20" if name in IMAGE_CODECS else "uncompressed" if name == "uncompressed" else
                                                          "postproc-1" if name == "postproc" else "d1-1")}
    assert [o.bytes for o in outcomes] == sizes and [o.bpp for o in outcomes] == [8 * s / CODEC_VIEW for s in sizes]
    assert all(o.random_weights for o in outcomes)  # the seeded CLIP
    assert all((o.edge_ms == 0) == (name == "uncompressed") for o in outcomes)
    for outcome, answer, image in zip(outcomes, answers, images):
        assert outcome.text == answer.text
        assert [e["label"] for e in outcome.details["labels"]] == [e["label"] for e in answer.details["labels"]]
        assert [e["probability"] for e in outcome.details["labels"]] == pytest.approx([e["probability"] for e in answer.details["labels"]], abs=2e-6)
        assert (outcome.reconstruction is None) if image is None else torch.allclose(outcome.reconstruction, image, atol=1e-6)
    if name == "uncompressed":
        assert {o.bpp for o in outcomes} == {24.0}


def test_rate_points_share_the_runs_backends_and_each_codes_with_its_own_weights(tiny, tiny_pipeline, folders, items):
    pipeline = build_pipeline("comneck", tiny_pipeline, [folders["d1_1"], folders["d1_2"]])
    assert [(p.label, p.rate, p.weights) for p in pipeline.points()] == [("d1-1", 1, folders["d1_1"]), ("d1-2", 2, folders["d1_2"])]
    for point in pipeline.points():
        (outcome,) = pipeline.run(point, items[:1], [PROMPT], backend="clip-zero-shot", task="classify")
        assert outcome.bytes == len(container(tiny, point.weights, items[0].image))
        assert pipeline.at(point, "paper").pipeline.backends is tiny_pipeline.backends


def test_the_same_containers_answer_the_same_in_process_and_over_http(tiny, tiny_pipeline, folders, items):
    folder = folders["d1_1"]
    settings = ServerSettings(port=free_port())
    served = Pipeline.from_pretrained(folder, preset="tiny", backends=["clip-zero-shot"])
    options = [GenerationOptions(top_k=1), GenerationOptions(top_k=3)]
    in_process = build_pipeline("comneck", tiny_pipeline, [folder])
    with serving(create_app(settings, Gateway(served, settings)), settings) as port:
        remote = build_pipeline("comneck", tiny_pipeline, [folder], server=f"http://127.0.0.1:{port}")
        (point,) = remote.points()
        over_http = remote.run(point, items, [PROMPT] * 2, options=options, backend="clip-zero-shot", task="classify")
        viewed = remote.run(point, items[:1], [""], task="human")
    local = in_process.run(point, items, [PROMPT] * 2, options=options, backend="clip-zero-shot", task="classify")
    assert [(o.text, o.details, o.bytes, o.bpp) for o in over_http] == [(o.text, o.details, o.bytes, o.bpp) for o in local]
    assert [len(o.details["labels"]) for o in local] == [1, 3]
    # /reconstruct's PNG is g_s's image in 8 bits
    image = reference(tiny, folder).reconstruct(container(tiny, folder, items[0].image))
    assert torch.equal(viewed[0].reconstruction, (image * 255).round() / 255)


class Recorder:
    """A few-shot backend that keeps the features it is shown (support described, queries asked)."""

    spec = BackendSpec("stub-fewshot", "x:Y", "test stub", ("fewshot",), TAP)
    random_weights = False

    def __init__(self) -> None:
        self.described: list[torch.Tensor] = []
        self.asked: list[torch.Tensor] = []

    def check_prompt(self, prompt, task, options, choices=()):
        pass

    def check_support(self, labels):
        pass

    def describe(self, features):
        self.described.append(features.clone())
        return [f"image {i}" for i in range(len(features))]

    def fewshot(self, features, support, options):
        self.asked.append(features.clone())
        return [BackendAnswer(support[0].label, {"shown": [s.label for s in support]}) for _ in features]


@pytest.mark.parametrize("name", ["comneck", "jpeg"])
def test_few_shot_support_goes_through_the_querys_pipeline_and_point(name, tiny, tiny_pipeline, folders, tmp_path, monkeypatch):
    recorder = Recorder()
    monkeypatch.setitem(tiny_pipeline.backends, "stub-fewshot", recorder)
    (episode,) = fewshot_episodes(write_fewshot(tmp_path))[:1]
    pipeline = build_pipeline(name, tiny_pipeline, [folders["d1_1"]], qualities=[30])
    (point,) = pipeline.points()
    (outcome,) = pipeline.run(point, [episode], [""], backend="stub-fewshot", task="fewshot")
    photos = [episode.image, *(s.image for s in episode.support)]  # the pipeline's batch: the query, then the support
    ref = reference(tiny, folders["d1_1"])
    if name == "comneck":
        data = [container(tiny, folders["d1_1"], p) for p in photos]
        features = ref.select(ref.features(ref.decode([ref.parse(d) for d in data]), [TAP]), TAP)
    else:
        files = [pillow_file(p, "JPEG", 30) for p in photos]
        features = ref.select(ref.pixel_features([to_tensor(Image.open(io.BytesIO(f)).convert("RGB")) for f in files], [TAP]), TAP)
        data = files
    assert torch.allclose(recorder.asked[0], features[:1], atol=1e-5)
    assert torch.allclose(recorder.described[0], features[1:], atol=1e-5)
    assert outcome.details["shown"] == [s.label for s in episode.support] and outcome.text == episode.support[0].label
    assert outcome.bytes == len(data[0]) and outcome.random_weights  # the seeded CLIP


@pytest.mark.parametrize("name", ["comneck", "reconstruction", "uncompressed", "webp"])
def test_human_viewing_returns_the_decoded_codec_view_image_and_counts_only_the_networks_it_ran(name, tiny, tiny_pipeline, folders, tmp_path):
    photos = kodak(write_kodak(tmp_path))
    pipeline = build_pipeline(name, tiny_pipeline, [folders["d1_1"]], qualities=[50])
    assert pipeline.policy(None, "human") == "paper"
    (point,) = pipeline.points()
    outcomes = pipeline.run(point, photos, [""] * 2, task="human")
    framed = [to_tensor(resize_for_codec(load_image(item.image), "paper", 256)) for item in photos]
    if name in ("comneck", "reconstruction"):
        ref = reference(tiny, folders["d1_1"])
        expected = [ref.reconstruct(container(tiny, folders["d1_1"], item.image)) for item in photos]
    elif name == "webp":
        expected = [to_tensor(Image.open(io.BytesIO(pillow_file(item.image, "WEBP", 50))).convert("RGB")) for item in photos]
    else:
        expected = framed
    for outcome, image, original in zip(outcomes, expected, framed):
        assert outcome.reconstruction.shape == original.shape == (1, 3, 256, 256)
        assert torch.allclose(outcome.reconstruction, image, atol=1e-6) and outcome.text == "" and outcome.details == {}
        assert not outcome.random_weights  # the codec is the folder's; the seeded CLIP and neck did not run


@pytest.mark.parametrize("name", ["jpeg", "webp"])
def test_calibrate_finds_per_target_the_quality_of_nearest_mean_bpp(name, tmp_path):
    """Against every quality tried: the chosen one is the nearest, up to the largest dip of the curve
    (JPEG and WebP files shrink by a few bytes at a step or two: bisection assumes they never do)."""
    images = [resize_for_codec(load_image(item.image), "paper", 256) for item in kodak(write_kodak(tmp_path))]
    codec = IMAGE_CODECS[name]
    qualities = range(codec.lowest, codec.highest + 1)
    mean_bpp = {q: sum(8 * len(pipelines.encode_image(im, codec, q)) / CODEC_VIEW for im in images) / len(images) for q in qualities}
    curve = [mean_bpp[q] for q in qualities]
    dip = max(0.0, *(a - b for a, b in zip(curve, curve[1:])))
    assert dip < 0.01 and curve[-1] > 5 * curve[0]  # nearly monotone (a few bytes), and a wide range
    targets = sorted([curve[0] / 2, 0.3, 0.6, 1.0, (curve[10] + curve[11]) / 2, curve[-1] * 2])
    chosen = calibrate(name, images, targets)
    for target, quality in zip(targets, chosen):
        assert abs(mean_bpp[quality] - target) <= min(abs(b - target) for b in curve) + dip
    assert chosen[0] == codec.lowest and chosen[-1] == codec.highest and {codec.lowest + 10, codec.lowest + 11} & set(chosen)
    assert chosen == sorted(chosen)  # a higher target, a quality no lower


def assert_refused(call, code: ErrorCode, *needles: str) -> None:
    """``call`` raises a one-line ComneckInputError of ``code`` naming each needle."""
    with pytest.raises(ComneckInputError) as info:
        call()
    message = str(info.value)
    assert info.value.code == code and "\n" not in message and all(n in message for n in needles), message


def test_bad_configurations_are_refused_in_one_line(tiny, tiny_pipeline, folders, tmp_path, monkeypatch):
    other = tmp_path / "paper_d1_1"
    write_folder(other, "paper", {"neck": torch.nn.Linear(2, 2)}, {"scenario": "d1", "rate": 1})
    build = lambda *args, **kwargs: lambda: build_pipeline(*args, **kwargs)  # noqa: E731
    assert_refused(build("gif", tiny_pipeline), ErrorCode.BAD_CONFIG, "unknown pipeline 'gif'", "comneck")
    assert_refused(build("comneck", tiny_pipeline, [folders["d1_1"], other]), ErrorCode.BAD_WEIGHTS, str(other), "'paper'", "'tiny'")
    assert_refused(build("reconstruction", tiny_pipeline, [folders["d1_1"], folders["d1_2"], folders["d1_1"]]), ErrorCode.BAD_CONFIG,
                   "rate point d1-1 is listed twice")
    assert_refused(build("jpeg", tiny_pipeline, qualities=[10, 20, 10]), ErrorCode.BAD_CONFIG, "rate point q10 is listed twice")
    assert_refused(build("jpeg", tiny_pipeline, qualities=[0, 50, 96]), ErrorCode.BAD_CONFIG, "[0, 96]", "1..95")
    assert_refused(build("webp", tiny_pipeline, server="http://127.0.0.1:1"), ErrorCode.BAD_CONFIG, "pipeline webp runs in process")
    monkeypatch.setattr(pipelines.features, "check", lambda feature: feature != "avif")
    assert_refused(build("avif", tiny_pipeline), ErrorCode.BAD_CONFIG, "no AVIF codec")
    assert_refused(lambda: calibrate("avif", [Image.new("RGB", (8, 8))], [1.0]), ErrorCode.BAD_CONFIG, "no AVIF codec")
