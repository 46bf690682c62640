import pytest
import torch

from comneck.codec import LearnedCodec
from comneck.errors import ComneckInputError
from comneck.image import pad_to_stride, unpad
from comneck.models import build_codec
from comneck.presets import CodecConfig


def test_entropy_decode_gives_bit_identical_y_hat(tiny_models):
    codec = tiny_models.codec
    x = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(1))
    latents, y_hat_enc = codec.analyze(x)
    y_hat_dec = codec.entropy_decode(latents)
    assert y_hat_dec.shape == (2, 40, 8, 12)
    assert torch.equal(y_hat_enc, y_hat_dec)
    assert len(latents.strings) == 11 and latents.batch_size == 2
    assert latents.num_bytes == sum(len(s) for stream in latents.strings for s in stream)


def test_one_item_of_a_batch_decodes_alone(tiny_models):
    """Same symbols; y_hat = symbol + predicted mean, and the mean's last bits depend on the
    batch size (another BLAS path), so batch-1 decoding of a batch-2 encode is close, not equal."""
    codec = tiny_models.codec
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    latents, y_hat = codec.analyze(x)
    torch.testing.assert_close(codec.entropy_decode(latents.item(1)), y_hat[1:], atol=1e-5, rtol=0)


def test_official_elic_variant_round_trips():
    codec = LearnedCodec(CodecConfig(arch="elic2022-official", N=32, M=40, groups=(2, 2, 4, 8, 24))).eval()
    codec.update_entropy_tables()
    latents, y_hat = codec.analyze(torch.rand(1, 3, 64, 128))
    assert torch.equal(codec.entropy_decode(latents), y_hat)


def test_padding_round_trip_restores_original_size(tiny_models):
    x = torch.rand(1, 3, 100, 75)
    padded, padding = pad_to_stride(x)
    assert padded.shape[-2:] == (128, 128)
    assert padding.padded_size(100, 75) == (128, 128)
    assert torch.equal(unpad(padded, padding), x)
    codec = tiny_models.codec
    latents, _ = codec.analyze(padded)
    x_hat = unpad(codec.synthesize(codec.entropy_decode(latents)), padding)
    assert x_hat.shape == x.shape
    assert 0.0 <= x_hat.min() and x_hat.max() <= 1.0


@pytest.mark.parametrize(
    "bad",
    [torch.rand(1, 3, 100, 100), torch.rand(1, 4, 64, 64), torch.rand(3, 64, 64), torch.zeros(1, 3, 0, 64)],
    ids=["not-padded", "four-channels", "no-batch-dim", "empty"],
)
def test_analyze_refuses_bad_tensors(tiny_models, bad):
    with pytest.raises(ComneckInputError):
        tiny_models.codec.analyze(bad)


def test_entropy_decode_refuses_wrong_stream_count(tiny_models):
    latents, _ = tiny_models.codec.analyze(torch.rand(1, 3, 64, 64))
    latents.strings.pop()
    with pytest.raises(ComneckInputError, match="11 entropy-coded streams"):
        tiny_models.codec.entropy_decode(latents)


def test_seeded_builds_agree_so_edge_and_cloud_share_weights(tiny):
    a, b = build_codec(tiny).state_dict(), build_codec(tiny).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_codec_is_refused():
    with pytest.raises(ComneckInputError, match="unknown codec"):
        CodecConfig(arch="bpg")
