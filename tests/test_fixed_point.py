"""Fixed-point entropy parameters: exact integer sums, the same bits under every configuration,
containers that say which evaluation coded them."""

import copy
import math
import zlib
from dataclasses import replace

import pytest
import torch
from compressai.layers import CheckerboardMaskedConv2d
from torch import nn
from torch.nn import functional as F

from comneck.bitstream import CODEC_IDS, FIXED_POINT_FLAG, SOURCE_FLAG, Bitstream, BitstreamError
from comneck.codec import LearnedCodec
from comneck.fixed_point import ACTIVATION_LIMIT, FRACTION_BITS, SLOPE_BITS, FixedPointNet, fixed_point_parameters, parameter_networks
from comneck.image import load_image, pad_to_stride, resize_for_codec, sample_photo, to_tensor
from comneck.models import build_codec
from comneck.presets import ELIC_ARCHS, get_preset
from comneck_edge import EdgeEncoder

GRID = 2.0**FRACTION_BITS


def nonzero(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random and away from zero (a zero hides a bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.rand(p.shape, generator=g) + 0.1) * torch.where(torch.rand(p.shape, generator=g) < 0.5, -1, 1) * 0.3)
    return module.eval()


def nets() -> dict[str, nn.Module]:
    return {
        "h_s": nonzero(nn.Sequential(nn.ConvTranspose2d(6, 8, 5, 2, 2, 1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 5, 2, 2, 1), nn.ReLU(),
                                     nn.Conv2d(8, 10, 3, 1, 1)), 1),
        "context": nonzero(CheckerboardMaskedConv2d(4, 8, 5, padding=2), 2),
        "params": nonzero(nn.Sequential(nn.Conv2d(12, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1)), 3),
        # mbt2018-mean's h_s: leaky ReLUs (slope 0.01)
        "h_s_leaky": nonzero(nn.Sequential(nn.ConvTranspose2d(6, 8, 5, 2, 2, 1), nn.LeakyReLU(inplace=True),
                                           nn.ConvTranspose2d(8, 12, 5, 2, 2, 1), nn.LeakyReLU(inplace=True),
                                           nn.Conv2d(12, 10, 3, 1, 1)), 4),
    }


def integer_reference(net: FixedPointNet, x: torch.Tensor) -> torch.Tensor:
    """The published equations in int64: a = round(x * 2**F); per layer, acc = W_int * a + b_int
    (im2col and an integer matrix product, or a scatter for transposed convolutions), a =
    floor(acc / 2**shift + 1/2), (leaky) ReLU, clamp. Python integers would do; int64 is exact here too."""
    limit = ACTIVATION_LIMIT * 2**FRACTION_BITS
    a = torch.floor(x.double() * GRID + 0.5).clamp(-limit, limit).long()
    for layer in net._layers:
        c, w = layer.conv, layer.weight.long()
        shift = (-torch.log2(layer.unscale.view(-1))).round().long()
        n, _, h, wd = a.shape
        if isinstance(c, nn.ConvTranspose2d):  # each input pixel scatters weight * value
            kh, kw = w.shape[-2:]
            (s, _), (p, _), (op, _) = c.stride, c.padding, c.output_padding
            full = torch.zeros(n, w.shape[1], (h - 1) * s + kh, (wd - 1) * s + kw, dtype=torch.long)
            for i in range(h):
                for j in range(wd):
                    full[:, :, i * s : i * s + kh, j * s : j * s + kw] += torch.einsum("nc,cokl->nokl", a[:, :, i, j], w)
            acc = full[:, :, p : p + (h - 1) * s - 2 * p + kh + op, p : p + (wd - 1) * s - 2 * p + kw + op]
        else:
            kh, kw = w.shape[-2:]
            cols = F.unfold(a.double(), (kh, kw), padding=c.padding).round().long()  # a copy of integers: exact
            acc = (w.view(w.shape[0], -1) @ cols).view(n, w.shape[0], h, wd)
        acc = acc + layer.bias.long().view(1, -1, 1, 1)
        right, left = shift.clamp(min=0).view(1, -1, 1, 1), (-shift).clamp(min=0).view(1, -1, 1, 1)
        half = (1 << (shift - 1)).clamp(min=0).view(1, -1, 1, 1)
        a = torch.where(right > 0, (acc + half) >> right, acc << left)  # floor(acc / 2**shift + 1/2)
        if layer.slope is not None:  # floor(a * k / 2**16 + 1/2) for a < 0, k / 2**16 the slope
            k = round(layer.slope * 2**SLOPE_BITS)
            a = torch.where(a < 0, torch.div(a * k + 2 ** (SLOPE_BITS - 1), 2**SLOPE_BITS, rounding_mode="floor"), a)
        a = a.clamp(-limit, limit)
    return a.double() / GRID


@pytest.mark.parametrize("name", ["h_s", "context", "params", "h_s_leaky"])
def test_fixed_point_equals_the_integer_equations_and_stays_near_the_float_net(name):
    module = nets()[name]
    net = FixedPointNet(module)
    x = torch.randn(2, module[0].in_channels if isinstance(module, nn.Sequential) else module.in_channels, 6, 6) * 4
    out = net(x)
    assert out.dtype == torch.float32 and torch.equal((out * GRID).round(), out * GRID)  # on the grid
    assert torch.equal(out.double(), integer_reference(net, x))
    with torch.no_grad():
        reference = module(x)
    assert (out - reference).abs().max() < 0.02 * max(1.0, float(reference.abs().max()))
    assert float(out.abs().max()) > 0.1  # not a dead net


def test_worst_case_sums_stay_exact():
    """Inputs at the limit, signed to add up every weight of one output: the float64 sum still
    equals the integer sum, which needs every partial sum below 2**53."""
    module = nonzero(nn.Conv2d(64, 4, 5, padding=2), 4)
    with torch.no_grad():
        module.weight[0].fill_(5.0)  # one channel with large weights everywhere
    net = FixedPointNet(module)
    layer = net._layers[0]
    x = (torch.sign(module.weight[0:1]) * ACTIVATION_LIMIT).float()  # [1, 64, 5, 5]: every tap adds
    assert torch.equal(net(x).double(), integer_reference(net, x))
    bound = layer.weight.abs().flatten(1).sum(1) * ACTIVATION_LIMIT * GRID + layer.bias.abs()
    assert float(bound.max()) < 2.0**52 and float(bound.max()) > 2.0**50  # the scale uses the room it has
    assert math.isclose(float(layer.weight[0].abs().max() * layer.unscale.view(-1)[0]), 5.0, rel_tol=1e-6)


def test_the_same_bits_under_threads_batches_and_memory_layouts():
    module = nets()["h_s"]
    net = FixedPointNet(module)
    x = torch.randn(4, 6, 5, 7) * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = net(x[1:2])
        torch.set_num_threads(2)
        batch = net(x)
        channels_last = net(x.contiguous(memory_format=torch.channels_last))
        torch.backends.mkldnn.enabled = False
        plain = net(x)
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = True
    assert torch.equal(one, batch[1:2]) and torch.equal(batch, channels_last) and torch.equal(batch, plain)
    assert torch.equal(net(x.double()).float(), batch)


def test_unsupported_layers_are_named():
    with pytest.raises(ValueError, match="not GELU"):
        FixedPointNet(nn.Sequential(nn.Conv2d(2, 2, 1), nn.GELU()))


@pytest.mark.parametrize("arch", ELIC_ARCHS)
def test_every_parameter_network_of_both_elic_variants_is_converted(tiny, arch):
    codec = LearnedCodec(replace(tiny.codec, arch=arch))
    codec.update_entropy_tables()
    groups = len(tiny.codec.groups)
    found = parameter_networks(codec.model)
    assert len(found) == 1 + (groups - 1) + 2 * groups  # h_s, channel contexts, (context, params) per group
    assert all(isinstance(getattr(m, "_comneck_fixed_point", None), FixedPointNet) for m in found)


def test_mbt2018_means_one_parameter_network_is_converted():
    codec = LearnedCodec(get_preset("tiny-mbt2018-mean").codec)
    codec.update_entropy_tables()
    assert parameter_networks(codec.model) == [codec.model.latent_codec["hyper"].h_s]
    assert isinstance(codec.model.latent_codec["hyper"].h_s._comneck_fixed_point, FixedPointNet)


def photo_tensor(preset) -> torch.Tensor:
    return pad_to_stride(to_tensor(resize_for_codec(load_image(sample_photo()), "paper", preset.image_size)))[0]


def test_codec_round_trip_is_bit_exact_across_threads_and_batches(tiny_models, tiny):
    codec = tiny_models.codec
    x = torch.cat([photo_tensor(tiny), photo_tensor(tiny).flip(-1)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        latents, y_edge = codec.analyze(x)
        torch.set_num_threads(2)
        alone = codec.entropy_decode(latents.item(1))
    finally:
        torch.set_num_threads(threads)
    assert latents.fixed_point and torch.equal(codec.entropy_decode(latents), y_edge)
    assert torch.equal(alone, y_edge[1:])
    assert torch.equal((y_edge * GRID).round(), y_edge * GRID)  # symbol + mean: on the grid


def test_the_container_records_the_evaluation_and_old_containers_still_decode(tiny_models, tiny):
    codec = tiny_models.codec
    fixed = EdgeEncoder(tiny).encode_file(sample_photo())
    plain = EdgeEncoder(tiny, fixed_point=False).encode_file(sample_photo())
    codec_byte = CODEC_IDS[tiny.codec.arch] | SOURCE_FLAG  # the edge records the photo too
    assert fixed.data[5] == codec_byte | FIXED_POINT_FLAG and plain.data[5] == codec_byte
    assert (fixed.entropy_params, plain.entropy_params) == ("fixed-point", "float")
    for encoded, fixed_point in ((fixed, True), (plain, False)):
        stream = Bitstream.from_bytes(encoded.data)
        assert stream.latents.fixed_point is fixed_point and stream.to_bytes() == encoded.data
        _, y_edge = codec.analyze(photo_tensor(tiny), fixed_point)
        assert torch.equal(codec.entropy_decode(stream.latents), y_edge)
    # A float container holds CompressAI's own strings: what its compress writes for that input.
    with torch.no_grad():
        assert codec.model.compress(photo_tensor(tiny))["strings"] == Bitstream.from_bytes(plain.data).latents.strings


def test_a_flagged_unknown_codec_id_is_refused(tiny):
    data = bytearray(EdgeEncoder(tiny).encode_file(sample_photo()).data)
    data[5] = FIXED_POINT_FLAG | SOURCE_FLAG | 0x3F  # both flags kept (the photo's fields follow), an unknown id
    data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "big")
    with pytest.raises(BitstreamError) as err:
        Bitstream.from_bytes(bytes(data))
    assert err.value.code == "unknown_codec" and "codec id 63" in str(err.value)


def test_a_deep_copy_converts_its_own_weights(tiny):
    codec = build_codec(tiny)
    clone = copy.deepcopy(codec)
    with torch.no_grad():
        for p in clone.model.latent_codec["hyper"].h_s.parameters():
            p.mul_(1.5)
    clone.update_entropy_tables()
    x = torch.randn(1, tiny.codec.N, 2, 2)
    h_s, h_s_clone = codec.model.latent_codec["hyper"].h_s, clone.model.latent_codec["hyper"].h_s
    with fixed_point_parameters(), torch.no_grad():
        assert not torch.equal(h_s(x), h_s_clone(x))
        assert torch.equal(h_s(x), FixedPointNet(h_s)(x))
    with torch.no_grad():
        assert torch.equal(h_s(x), type(h_s).forward(h_s, x))  # outside the block: the float network
