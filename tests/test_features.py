import dataclasses

import pytest
import torch

from comneck.bitstream import Bitstream, BitstreamError
from comneck.image import load_image, resize_for_codec, sample_photo, to_tensor
from comneck_edge import EdgeEncoder
from comneck.models import build_cloud_models
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


def test_neck_and_tail_run_in_half_precision_while_decoding_stays_float32(tiny, tiny_models):
    stream = EdgeEncoder(tiny).encode_file(sample_photo()).bitstream
    reference = FeaturePipeline(tiny_models)(stream)
    half = build_cloud_models(tiny).to("cpu", torch.bfloat16)
    out = FeaturePipeline(half)(stream)
    assert out.y_hat.dtype == torch.float32 and torch.equal(out.y_hat, reference.y_hat)
    assert out.tokens.dtype == out.features.embedding.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out.features.embedding.float(), reference.features.embedding)
    assert cos.item() > 0.99
