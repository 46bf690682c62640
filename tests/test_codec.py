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


class Times(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@pytest.mark.parametrize("preset, arch", [("tiny", "elic2022-chandelier"), ("tiny", "elic2022-official"),
                                          ("tiny-mbt2018-mean", "mbt2018-mean")])
@pytest.mark.parametrize("fixed_point", [True, False])
def test_analyze_writes_compressais_bytes_without_decoding_them_again(preset, arch, fixed_point, monkeypatch):
    """The edge skips CompressAI's decode of its own strings inside compress(): the same strings and
    y_hat as CompressAI's compress, out-of-range symbols (its bypass coding) included, and no
    entropy decoding runs."""
    import copy
    from dataclasses import replace
    from functools import partial

    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.latent_codecs import GaussianConditionalLatentCodec, HyperLatentCodec

    from comneck.fixed_point import fixed_point_parameters
    from comneck.presets import get_preset

    chosen = get_preset(preset)
    codec = build_codec(replace(chosen, codec=replace(chosen.codec, arch=arch)))
    codec.model.g_a = torch.nn.Sequential(codec.model.g_a, Times(40.0))  # large latents: symbols past the tables
    x = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(3))
    compressai = copy.deepcopy(codec.model)
    for module in compressai.modules():  # CompressAI's own compress again, coding from its padded tables
        if isinstance(module, (GaussianConditionalLatentCodec, HyperLatentCodec)):
            del module.compress
        if isinstance(module, GaussianConditional):
            del module.compress, module.decompress
    with fixed_point_parameters(fixed_point), torch.inference_mode():
        expected = compressai.compress(x)
    decoded, bypassed = [], []

    def watched(self, encode, inputs, indexes, means=None):  # is any symbol outside its table (the bypass path)?
        symbols = torch.round(inputs - means).long() if means is not None else torch.round(inputs).long()
        index = indexes.long()
        low, high = self._offset[index], self._offset[index] + self._cdf_length[index] - 2
        bypassed.append(bool(((symbols < low) | (symbols > high)).any()))
        return encode(inputs, indexes, means)

    for module in codec.model.modules():
        if isinstance(module, GaussianConditional):
            monkeypatch.setattr(module, "compress", partial(watched, module, module.compress))
            monkeypatch.setattr(module, "decompress", lambda *a, **k: decoded.append(1))
    monkeypatch.setattr(EntropyBottleneck, "decompress", lambda *a, **k: decoded.append(1))
    latents, y_hat = codec.analyze(x, fixed_point)
    assert latents.strings == expected["strings"] and torch.equal(y_hat, expected["y_hat"]) and not decoded
    assert any(bypassed)
    monkeypatch.undo()
    assert torch.equal(codec.entropy_decode(latents), y_hat)
