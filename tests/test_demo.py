import dataclasses
import subprocess
import sys

import pytest
import torch

from comneck.bitstream import Bitstream, BitstreamError
from comneck.image import load_image, resize_for_codec, sample_photo, to_tensor
from comneck_edge import EdgeEncoder
from comneck_server.features import FeaturePipeline


def test_edge_to_cloud_features_on_the_bundled_photo(tiny, tiny_models):
    encoder = EdgeEncoder(tiny)
    encoded = encoder.encode_file(sample_photo())
    stream = Bitstream.from_bytes(encoded.data)
    assert stream.image_size == (256, 256) and stream.latents.padded_size == (256, 256)
    out = FeaturePipeline(tiny_models)(stream, hidden_blocks=[4])
    assert out.y_hat.shape == (1, 40, 16, 16)
    assert out.tokens.shape == (1, 257, 64)
    assert out.features.embedding.shape == (1, 32) and out.features.hidden[4].shape == (1, 257, 64)
    assert set(out.timings_ms) == {"entropy_decode", "neck", "clip_tail"}
    # the cloud, building the preset on its own, decodes exactly what the edge coded
    _, y_hat_edge = encoder.codec.analyze(to_tensor(resize_for_codec(load_image(sample_photo()), "paper")))
    assert torch.equal(out.y_hat, y_hat_edge)


def test_gateway_refuses_a_bitstream_from_another_codec(tiny, tiny_models):
    stream = EdgeEncoder(tiny).encode_file(sample_photo()).bitstream
    pipeline = FeaturePipeline(tiny_models)
    for foreign in (
        dataclasses.replace(stream, fingerprint=bytes(8)),
        dataclasses.replace(stream, codec="elic2022-official"),
    ):
        with pytest.raises(BitstreamError) as info:
            pipeline(foreign)
        assert info.value.code == "codec_mismatch"


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comneck_server.demo", *args], capture_output=True, text=True)


def test_demo_prints_bpp_shapes_timings_and_says_weights_are_random():
    run = run_demo()
    assert run.returncode == 0, run.stderr
    for expected in ("RANDOM WEIGHTS", "bpp", "container),", "[1, 40, 16, 16]", "[1, 257, 64]", "CLIP block 3", "timings (ms)"):
        assert expected in run.stdout


def test_demo_reports_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\x00" * 10)
    for args in (["--image", str(bad)], ["--image", str(tmp_path / "nope.png")], ["--rate", "9"]):
        run = run_demo(*args)
        assert run.returncode == 2
        assert run.stderr.startswith("comneck-demo: error:") and run.stderr.count("\n") == 1
        assert "Traceback" not in run.stderr
