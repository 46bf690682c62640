"""The cloud path as a library: parse -> decode -> features -> backend, composed by comneck.pipeline."""

import dataclasses
from pathlib import Path

import pytest
import torch

from comneck import Pipeline as TopLevelPipeline
from comneck.backends import GenerationOptions
from comneck.bitstream import BitstreamError
from comneck.clip_split import ClipTap
from comneck.errors import ComneckInputError
from comneck.image import load_image, resize_for_codec, sample_photo, to_tensor
from comneck.models import WeightFiles, build_cloud_models
from comneck.pipeline import Pipeline
from comneck.presets import PRESETS
from comneck.weights_folder import write_folder
import comneck_edge
from comneck_edge import EdgeEncoder

PROMPT = "Labels: cow, horse, beach"


@pytest.fixture(scope="module")
def encoded(tiny):
    return EdgeEncoder(tiny).encode_file(sample_photo())


def test_edge_to_cloud_features_on_the_bundled_photo(tiny, tiny_pipeline, encoded):
    stream = tiny_pipeline.parse(encoded.data)
    assert stream.image_size == (256, 256) and stream.latents.padded_size == (256, 256)
    (y_hat,) = tiny_pipeline.decode([stream])
    assert y_hat.shape == (1, 40, 16, 16) and y_hat.dtype == torch.float32
    timings = {}
    features = tiny_pipeline.features([y_hat], [ClipTap("hidden", block=4)], timings)
    assert features.embedding.shape == (1, 32) and features.hidden[4].shape == (1, 257, 64)
    assert set(timings) == {"neck", "clip_tail"}
    # the cloud, building the preset on its own, decodes exactly what the edge coded
    _, y_hat_edge = EdgeEncoder(tiny).codec.analyze(to_tensor(resize_for_codec(load_image(sample_photo()), "paper")))
    assert torch.equal(y_hat, y_hat_edge)


def test_a_batch_equals_its_items_one_at_a_time(tiny, tiny_pipeline):
    encoder = EdgeEncoder(tiny)
    photos = sorted(sample_photo().parent.glob("*.png"))[:2] + [sample_photo()]
    data = [encoder.encode_file(p).data for p in photos]
    prompts = [PROMPT, "Labels: dog, city street", PROMPT]
    batch = tiny_pipeline.answer(data, prompts)
    single = [tiny_pipeline.answer([d], [p])[0] for d, p in zip(data, prompts)]
    assert [a.text for a in batch] == [a.text for a in single]
    for a, b in zip(batch, single):
        assert [x["label"] for x in a.details["labels"]] == [x["label"] for x in b.details["labels"]]
        assert [x["probability"] for x in a.details["labels"]] == pytest.approx([x["probability"] for x in b.details["labels"]], abs=1e-5)
        assert a.num_bytes == b.num_bytes and a.random_weights and a.backend == "clip-zero-shot" and a.task == "classify"
    # one neck + tail pass for the batch: features of the batch equal those of each item
    y_hats = tiny_pipeline.decode([tiny_pipeline.parse(d) for d in data])
    together = tiny_pipeline.features(y_hats).embedding
    apart = torch.cat([tiny_pipeline.features([y]).embedding for y in y_hats])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)


def test_per_item_options_answer_each_item_as_its_own_call_does(tiny, tiny_pipeline, encoded):
    data = [encoded.data, EdgeEncoder(tiny).encode_file(sorted(sample_photo().parent.glob("*.png"))[0]).data]
    prompts = [PROMPT, "Labels: dog, city street, cow, sky"]
    options = [GenerationOptions(top_k=1), GenerationOptions(top_k=3, logprobs=2)]
    batch = tiny_pipeline.answer(data, prompts, options=options)
    single = [tiny_pipeline.answer([d], [p], options=o)[0] for d, p, o in zip(data, prompts, options)]
    assert [len(a.details["labels"]) for a in batch] == [1, 3] and [len(a.details.get("logprobs", [])) for a in batch] == [0, 2]
    for a, b in zip(batch, single):
        assert a.text == b.text and [x["label"] for x in a.details["labels"]] == [x["label"] for x in b.details["labels"]]
        assert [x["probability"] for x in a.details["labels"]] == pytest.approx([x["probability"] for x in b.details["labels"]], abs=1e-5)
        assert [x["label"] for x in a.details.get("logprobs", [])] == [x["label"] for x in b.details.get("logprobs", [])]
    # one GenerationOptions applies to every item, as before
    assert [len(a.details["labels"]) for a in tiny_pipeline.answer(data, prompts, options=GenerationOptions(top_k=2))] == [2, 2]
    assert tiny_pipeline.prepare(data, prompts, options=options[1]).options == [options[1]] * 2
    with pytest.raises(ComneckInputError) as info:
        tiny_pipeline.prepare(data, prompts, options=options[:1])
    assert info.value.code == "invalid_request" and str(info.value) == \
        "give one GenerationOptions per prompt, or one for all (got 1 for 2 prompts)"


def test_answer_equals_the_backend_on_the_tail_of_the_neck(tiny_pipeline, tiny_models, encoded):
    (answer,) = tiny_pipeline.answer([encoded.data], [PROMPT])
    with torch.inference_mode():
        y_hat = tiny_models.codec.entropy_decode(encoded.bitstream.latents)
        embedding = tiny_models.clip.tail(tiny_models.neck(y_hat)).embedding
    (expected,) = tiny_pipeline.backends["clip-zero-shot"].generate(embedding, [PROMPT], "classify", [GenerationOptions()])
    assert (answer.text, answer.details) == (expected.text, expected.details)
    assert list(answer.timings_ms) == ["entropy_decode", "neck", "clip_tail", "backend"]
    assert answer.bpp == pytest.approx(encoded.bpp) and answer.rate == 1


def test_cheap_checks_run_before_any_decoding(tiny_pipeline, encoded, monkeypatch):
    def no_decoding(streams):
        raise AssertionError("decoded before the request was checked")

    monkeypatch.setattr(tiny_pipeline, "decode", no_decoding)
    for prompt, task, backend, code in [("one-label", None, None, "bad_prompt"), ("  ", None, None, "empty_prompt"),
                                        (PROMPT, "caption", None, "unsupported_task"), (PROMPT, None, "llava", "unknown_backend")]:
        with pytest.raises(ComneckInputError) as info:
            tiny_pipeline.prepare([encoded.data], [prompt], task, backend)
        assert info.value.code == code
    with pytest.raises(ComneckInputError):
        tiny_pipeline.prepare([encoded.data], [PROMPT, PROMPT])


def test_pipeline_refuses_a_bitstream_from_another_codec(tiny_pipeline, encoded):
    stream = encoded.bitstream
    for foreign in (dataclasses.replace(stream, fingerprint=bytes(8)), dataclasses.replace(stream, codec="elic2022-official")):
        with pytest.raises(BitstreamError) as info:
            tiny_pipeline.answer([foreign], [PROMPT])
        assert info.value.code == "codec_mismatch"


def test_neck_and_tail_run_in_half_precision_while_decoding_stays_float32(tiny, tiny_pipeline, encoded):
    half = Pipeline(build_cloud_models(tiny).to("cpu", torch.bfloat16))
    (y_ref,) = tiny_pipeline.decode([encoded.bitstream])
    (y_half,) = half.decode([encoded.bitstream])
    assert y_half.dtype == torch.float32 and torch.equal(y_half, y_ref)
    out = half.features([y_half])
    assert out.embedding.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out.embedding.float(), tiny_pipeline.features([y_ref]).embedding)
    assert cos.item() > 0.99


def test_the_public_python_api_of_the_readme(encoded):
    data = comneck_edge.encode(sample_photo(), preset="tiny")
    assert data == encoded.data  # the same bytes as the encoder object gives
    pipeline = TopLevelPipeline.from_pretrained(preset="tiny")
    (answer,) = pipeline.answer([data], [PROMPT], options=GenerationOptions(top_k=2))
    assert answer.text in {"cow", "horse", "beach"} and len(answer.details["labels"]) == 2
    assert answer.random_weights and "RANDOM WEIGHTS" in answer.note
    with pytest.raises(ComneckInputError) as info:
        TopLevelPipeline.from_pretrained(preset="tiny", backends=["no-such-backend"])
    assert info.value.code == "unknown_backend"


def test_the_readme_python_example_runs_as_written(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = section[section.index("```python") + len("```python"): section.index("```", section.index("```python") + 9)]
    exec(code.replace('"photo.jpg"', repr(str(sample_photo()))), {})
    printed = capsys.readouterr().out.strip()
    assert printed.split(" ", 1)[0] in {"cow", "horse", "beach"} and printed.endswith("True")  # text ... random_weights


@pytest.fixture(scope="module")
def pipeline_336():
    return Pipeline.from_pretrained(preset="tiny-336")


@pytest.fixture(scope="module")
def encoded_336():
    return EdgeEncoder("tiny-336").encode_file(sample_photo())


def test_tiny_336_round_trip_has_the_llava_geometry(pipeline_336, encoded_336):
    # codec input 384 -> 24x24 latents -> 577 neck tokens -> CLIP at 336 px
    stream = pipeline_336.parse(encoded_336.data)
    assert stream.image_size == (384, 384) and stream.latents.padded_size == (384, 384)
    (y_hat,) = pipeline_336.decode([stream])
    assert y_hat.shape == (1, 40, 24, 24)
    features = pipeline_336.features([y_hat], [ClipTap("hidden", block=4)])
    assert features.hidden[4].shape == features.post_ln.shape == (1, 577, 64) and features.embedding.shape == (1, 32)
    (answer,) = pipeline_336.answer([encoded_336.data], [PROMPT])
    assert answer.text in {"cow", "horse", "beach"} and answer.image_size == (384, 384)
    assert answer.bpp == pytest.approx(8 * len(encoded_336.data) / 384**2)


def test_a_pipeline_refuses_the_other_geometrys_bitstream(tiny_pipeline, pipeline_336, encoded, encoded_336):
    # the tiny presets share one codec, so the container passes the codec check and the grid check refuses it
    assert tiny_pipeline.models.codec_fingerprint == pipeline_336.models.codec_fingerprint
    for pipeline, data, side in ((tiny_pipeline, encoded_336.data, 256), (pipeline_336, encoded.data, 384)):
        with pytest.raises(ComneckInputError) as info:
            pipeline.prepare([data], [PROMPT])
        assert info.value.code == "unsupported_size"
        assert f"takes a {side}x{side} codec input" in str(info.value) and f"--preset {pipeline.preset.name}" in str(info.value)


def test_the_full_clip_path_equals_open_clips_encode_image_on_clips_own_input(tiny_pipeline, tiny_models):
    """Pixels -> the full CLIP: CLIP's input is the codec-view image resized (bicubic, antialiased)
    to 224 and normalised with CLIP's statistics; then open_clip's own encode_image."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    image = to_tensor(resize_for_codec(load_image(sample_photo()), "paper"))
    x = torch.nn.functional.interpolate(image, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    x = (x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = tiny_models.clip_model.encode_image(x)
    assert torch.equal(tiny_pipeline.pixel_features([image]).embedding, reference)
    features = tiny_pipeline.pixel_features([image, image.flip(-1)], [ClipTap("hidden", block=4)])  # a batch: float rounding
    torch.testing.assert_close(features.embedding[:1], reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(features.embedding[1:], reference, atol=1e-3)
    assert set(features.hidden) == {4} and features.projected.shape[:2] == (2, 257)


def test_answer_pixels_answers_as_the_backend_does_on_the_full_clips_features(tiny_pipeline, tiny_models):
    images = [to_tensor(resize_for_codec(load_image(photo), "paper")) for photo in (sample_photo(), sample_photo("chicken_on_money.png"))]
    prompts = ["Labels: cow, beach, money", "Labels: chicken, money, cow, dog"]
    answers = tiny_pipeline.answer_pixels(images, prompts, options=[GenerationOptions(top_k=2), GenerationOptions(top_k=3)])
    features = tiny_pipeline.pixel_features(images)
    backend = tiny_pipeline.backends["clip-zero-shot"]
    expected = backend.generate(features.embedding, prompts, "classify", [GenerationOptions(top_k=2), GenerationOptions(top_k=3)])
    assert [a.text for a in answers] == [e.text for e in expected] and [a.details for a in answers] == [e.details for e in expected]
    assert [(a.num_bytes, a.bpp, a.image_size, a.task) for a in answers] == [(0, 0.0, (256, 256), "classify")] * 2
    with pytest.raises(ComneckInputError, match="one prompt per image"):
        tiny_pipeline.answer_pixels(images, prompts[:1])
    with pytest.raises(ComneckInputError, match="3 colour channels"):
        tiny_pipeline.answer_pixels([images[0][:, :1]], prompts[:1])



def test_with_models_serves_other_codec_and_neck_weights_beside_the_same_clip_and_backends(tiny, tiny_pipeline, tmp_path):
    """A rate point's codec and neck (a weights folder, every weight perturbed) join the pipeline's
    CLIP and backends (the same objects: loaded, lazy and failed alike) and answer as a pipeline
    built on that folder alone; a CLIP of other weights, or another preset, is refused."""
    models = build_cloud_models(tiny)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in [*models.codec.model.parameters(), *models.neck.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path / "d1_2"
    write_folder(folder, "tiny", {"codec": models.codec.model, "neck": models.neck}, {"scenario": "d1", "rate": 2})
    point = build_cloud_models(tiny, WeightFiles.bundle(folder))
    alone = Pipeline(point)
    alone.add_backend("clip-zero-shot")
    shared = tiny_pipeline.with_models(point)
    assert shared.models.clip_model is tiny_pipeline.models.clip_model and shared.models.codec is point.codec
    assert all(getattr(shared, name) is getattr(tiny_pipeline, name) for name in ("backends", "pending", "failed", "_order"))
    data = EdgeEncoder(tiny, codec_weights=folder).encode_file(sample_photo()).data
    with pytest.raises(ComneckInputError, match="differ from this decoder"):
        tiny_pipeline.answer([data], [PROMPT])
    (ours,), (theirs,) = shared.answer([data], [PROMPT]), alone.answer([data], [PROMPT])
    assert (ours.text, ours.random_weights) == (theirs.text, True)
    assert [e["label"] for e in ours.details["labels"]] == [e["label"] for e in theirs.details["labels"]]
    assert [e["probability"] for e in ours.details["labels"]] == pytest.approx([e["probability"] for e in theirs.details["labels"]], abs=2e-6)
    with torch.no_grad():
        next(point.clip_model.parameters()).add_(0.01)
    with pytest.raises(ComneckInputError, match="other weights than this pipeline's CLIP") as refused:
        tiny_pipeline.with_models(point)
    assert refused.value.code == "bad_weights"
    with pytest.raises(ComneckInputError, match="preset tiny-336") as refused:
        tiny_pipeline.with_models(build_cloud_models(PRESETS["tiny-336"]))
    assert refused.value.code == "bad_weights"
