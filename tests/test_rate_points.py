"""One pipeline (and one gateway) serving several rate points: each container decoded by the codec
whose fingerprint it carries and sent through that point's neck, the CLIP tail and backends shared,
a batch mixing points answered as each item alone; points that cannot share are refused."""

import dataclasses

import pytest
import torch

from comneck.bitstream import Bitstream
from comneck.errors import ComneckInputError
from comneck.image import sample_photo
from comneck.models import WeightFiles, build_cloud_models
from comneck.pipeline import Pipeline
from comneck.presets import PRESETS
from comneck.weights_folder import write_folder
from comneck_edge import EdgeEncoder
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings, read_settings

PROMPTS = ["Labels: cow, beach, money", "Labels: chicken, money, cow, dog"]


def rate_point(tiny, folder, rate: int, seed: int):
    """A weights folder holding the tiny codec and neck with every weight perturbed (another rate point)."""
    models = build_cloud_models(tiny)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*models.codec.model.parameters(), *models.neck.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    write_folder(folder, "tiny", {"codec": models.codec.model, "neck": models.neck}, {"scenario": "d1", "rate": rate})
    return folder


@pytest.fixture(scope="module")
def points(tiny, tmp_path_factory):
    return [rate_point(tiny, tmp_path_factory.mktemp("points") / f"d1_{rate}", rate, seed) for rate, seed in ((2, 7), (4, 8))]


@pytest.fixture(scope="module")
def containers(tiny, points):
    """The same photo coded by each point (rates 2 and 4), and by the seeded codec (rate 1)."""
    photo = sample_photo()
    return [EdgeEncoder(tiny).encode_file(photo).data, *(EdgeEncoder(tiny, codec_weights=p).encode_file(photo).data for p in points)]


@pytest.fixture(scope="module")
def served(tiny, points):
    """The seeded pipeline with both points beside it."""
    pipeline = Pipeline(build_cloud_models(tiny))
    pipeline.add_backend("clip-zero-shot")
    for folder in points:
        pipeline.add_rate_point(build_cloud_models(tiny, WeightFiles.bundle(folder), beside=pipeline.models))
    return pipeline


def labels(answer):
    return [(e["label"], e["probability"]) for e in answer.details["labels"]]


def test_a_batch_mixing_rate_points_is_answered_as_each_item_alone(tiny, points, containers, served):
    assert len(served.points) == 3 and all(m.clip_model is served.models.clip_model for m in served.points.values())
    items, prompts = [containers[2], containers[0], containers[1], containers[2]], [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    batched = served.answer(items, prompts)
    alone = [served.answer([item], [prompt])[0] for item, prompt in zip(items, prompts)]
    assert [labels(a) for a in batched] == [labels(a) for a in alone]  # bit for bit on the CPU in float32
    assert [a.rate for a in batched] == [4, 1, 2, 4] and all(a.random_weights for a in batched)  # CLIP is seeded
    # each item went through its own point's codec and neck: as a pipeline built on that point alone
    for folder, item in zip(points, containers[1:]):
        own = Pipeline(build_cloud_models(tiny, WeightFiles.bundle(folder)))
        own.add_backend("clip-zero-shot")
        (expected,) = own.answer([item], [PROMPTS[0]])
        (got,) = served.answer([item], [PROMPTS[0]])
        assert [label for label, _ in labels(got)] == [label for label, _ in labels(expected)]
        assert [p for _, p in labels(got)] == pytest.approx([p for _, p in labels(expected)], abs=2e-6)
        assert torch.equal(served.reconstruct(item), own.reconstruct(item))
    # the points' necks differ: the same photo's answers differ between rate points
    assert len({tuple(p for _, p in labels(a)) for a in batched[:3]}) == 3


def test_a_container_of_no_point_served_and_points_that_cannot_share_are_refused(tiny, points, containers, served):
    stranger = dataclasses.replace(Bitstream.from_bytes(containers[1]), fingerprint=bytes(8)).to_bytes()
    with pytest.raises(ComneckInputError, match="none of the rate points served here: seeded codec .*, rate 2 .*, rate 4") as refused:
        served.answer([stranger], [PROMPTS[0]])
    assert refused.value.code == "codec_mismatch"
    beside = served.models
    refusals = {
        "served already": build_cloud_models(tiny, WeightFiles.bundle(points[0]), beside=beside),
        "for preset tiny-336": build_cloud_models(PRESETS["tiny-336"]),
        "final norm twice, this pipeline's once": build_cloud_models(tiny, WeightFiles.bundle(points[0]), "twice", beside=beside),
        "skips 1 CLIP blocks": build_cloud_models(tiny, WeightFiles.bundle(points[0]), split_block=1, beside=beside),
    }
    other_clip = build_cloud_models(tiny, WeightFiles.bundle(points[0]))
    with torch.no_grad():
        next(other_clip.clip_model.parameters()).add_(0.01)
    refusals["other weights than this pipeline's"] = other_clip
    for words, models in refusals.items():
        with pytest.raises(ComneckInputError, match=words) as refused:
            served.add_rate_point(models)
        assert refused.value.code == "bad_weights"
    assert len(served.points) == 3


def test_the_gateway_serves_every_rate_point_through_its_decode_workers(points, containers, monkeypatch):
    monkeypatch.setenv("COMNECK_RATE_WEIGHTS", f"{points[0]},{points[1]}")
    assert read_settings([]).rate_weights == points
    assert read_settings(["--rate-weights", str(points[1])]).rate_weights == [points[1]]  # the flag wins
    gateway = Gateway.load(ServerSettings(weights=points[0], rate_weights=[points[1]], decode_workers=1))
    try:
        answers = [gateway.infer(data, PROMPTS[0]) for data in containers[1:]]
        assert [a.rate for a in answers] == [2, 4]
        assert gateway.workers is not None and gateway.pipeline.entropy_decode == gateway.workers.decode
        described = gateway.describe()["codec"]
        assert [(p["weights"]["rate"], p["random_weights"]) for p in described["rate_points"]] == [(2, True), (4, True)]
        assert described["rate_points"][0]["fingerprint"] == described["fingerprint"]
        assert gateway.describe()["random_parts"] == ["clip"] and gateway.random_weights  # over every point served
        with pytest.raises(ComneckInputError, match="none of the rate points served here") as refused:
            gateway.infer(containers[0], PROMPTS[0])  # the seeded codec is not served here
        assert refused.value.code == "codec_mismatch"
    finally:
        gateway.close()
