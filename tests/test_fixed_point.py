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


# The evaluation (matrix products on pre-scaled weights, skipped zero taps and channels) against the
# straightforward one it replaced: the same bits wherever the sums can go.

LIMIT = float(ACTIVATION_LIMIT * 2**FRACTION_BITS)


def float64_reference(net: FixedPointNet, x: torch.Tensor) -> torch.Tensor:
    """The previous evaluation, kept here as the reference: torch's float64 convolutions (cuDNN off)
    on the integers, then the equations' rounding steps, one tensor operation each."""
    a = torch.floor(x.double() * GRID + 0.5).clamp_(-LIMIT, LIMIT)
    with torch.backends.cudnn.flags(enabled=False):
        for layer in net._layers:
            c = layer.conv
            weight, bias, unscale = (t.to(x.device) for t in (layer.weight, layer.bias, layer.unscale))
            if isinstance(c, nn.ConvTranspose2d):
                acc = F.conv_transpose2d(a, weight, None, c.stride, c.padding, c.output_padding, c.groups, c.dilation)
            else:
                acc = F.conv2d(a, weight, None, c.stride, c.padding, c.dilation, c.groups)
            a = torch.floor((acc + bias.view(1, -1, 1, 1)) * unscale + 0.5)
            if layer.slope is not None:
                a = torch.where(a < 0, torch.floor(a * layer.slope + 0.5), a)
            a = a.clamp_(-LIMIT, LIMIT)
    return (a / GRID).to(x.dtype)


def adversarial(module: nn.Module, seed: int) -> nn.Module:
    """Heavy-tailed weights and large biases: big weight integers in every output channel, and
    with many inputs the scale set by the 2**52 bound rather than by the weights' 24 bits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * torch.exp(2 * torch.randn(p.shape, generator=g)))
    return module.eval()


def adversarial_nets() -> dict[str, nn.Module]:
    return {
        "wide_5x5": adversarial(nn.Conv2d(224, 6, 5, padding=2), 11),  # ELIC's channel context: 5600 terms a sum
        "wide_1x1": adversarial(nn.Conv2d(1408, 8, 1), 12),  # ELIC's entropy-parameter layers
        "strided_dilated": adversarial(nn.Conv2d(24, 8, 5, stride=2, padding=3, dilation=2), 13),
        "masked": adversarial(CheckerboardMaskedConv2d(96, 12, 5, padding=2), 14),
        "transposed": adversarial(nn.ConvTranspose2d(96, 8, 5, 2, 2, 1), 15),
        "grouped": adversarial(nn.Conv2d(16, 8, 3, padding=1, groups=2), 16),
        "stack": adversarial(nn.Sequential(nn.Conv2d(64, 48, 3, padding=1), nn.LeakyReLU(), nn.ConvTranspose2d(48, 16, 5, 2, 2, 1),
                                           nn.ReLU(), nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)), 17),
    }


def bounds(layer) -> torch.Tensor:
    """Per output channel: the largest sum the layer can form, sum |W| * limit + |b|."""
    return layer.weight.abs().flatten(1).sum(1) * LIMIT + layer.bias.abs()


def widest(layer) -> int:
    return int(bounds(layer).argmax())


def extreme_inputs(module: nn.Module, net: FixedPointNet, size: int = 6) -> torch.Tensor:
    """[3, in, size, size]: random values out to the limit and past it (clamped), the limit with
    random signs, and the limit signed as the weights of the output channel with the largest
    bound, so that its sum at the centre adds every term: that sum is the layer's bound."""
    first = module[0] if isinstance(module, nn.Sequential) else module
    g = torch.Generator().manual_seed(first.in_channels)
    x = torch.empty(3, first.in_channels, size, size)
    x[0] = torch.randn(x[0].shape, generator=g) * ACTIVATION_LIMIT
    x[1] = torch.where(torch.rand(x[1].shape, generator=g) < 0.5, -1.0, 1.0) * ACTIVATION_LIMIT
    x[2] = x[1]
    layer = net._layers[0]
    if not isinstance(layer.conv, nn.ConvTranspose2d) and layer.conv.stride == (1, 1) and layer.conv.dilation == (1, 1):
        (kh, kw), (ph, pw), c = layer.conv.kernel_size, layer.conv.padding, size // 2
        signs = torch.sign(layer.weight[widest(layer)]).float()  # [in / groups, kh, kw]
        x[2, : signs.shape[0], c - ph : c - ph + kh, c - pw : c - pw + kw] = torch.where(signs < 0, -1.0, 1.0) * ACTIVATION_LIMIT
    return x


@pytest.mark.parametrize("name", list(adversarial_nets()))
def test_the_evaluation_gives_the_straightforward_float64_bits_at_the_bounds(name):
    module = adversarial_nets()[name]
    net = FixedPointNet(module)
    x = extreme_inputs(module, net)
    out = net(x)
    assert torch.equal(out, float64_reference(net, x))
    if name not in ("strided_dilated", "grouped"):  # integer_reference's convolutions: stride 1, no dilation or groups
        assert torch.equal(out.double(), integer_reference(net, x))
    if name.startswith("wide"):  # the scale uses the room below 2**52, and the aligned input fills it
        layer = net._layers[0]
        assert 2.0**50 < float(bounds(layer).max()) < 2.0**52
        assert float(out[2, widest(layer)].abs().max()) == ACTIVATION_LIMIT  # clamped: the sum went far past the grid
    # leading and trailing input channels zero (left out of the product), and an all-zero input
    partial = x.clone()
    partial[:, : x.shape[1] // 3] = 0
    partial[:, -2:] = 0
    assert torch.equal(net(partial), float64_reference(net, partial))
    for colour in (0, 1):  # zero on one checkerboard colour (a context's second pass): a masked layer reads the other
        checkered = x.clone()
        checkered[..., 0::2, colour::2] = 0
        checkered[..., 1::2, 1 - colour :: 2] = 0
        assert torch.equal(net(checkered), float64_reference(net, checkered))
    zero = torch.zeros_like(x[:1])
    assert torch.equal(net(zero), float64_reference(net, zero))
    assert torch.equal(net(x[:0]), float64_reference(net, x[:0]))  # an empty batch


def test_every_parameter_network_of_the_tiny_codec_gives_the_straightforward_bits(tiny_models):
    g = torch.Generator().manual_seed(5)
    for module in parameter_networks(tiny_models.codec.model):
        net = module._comneck_fixed_point
        first = module[0] if isinstance(module, nn.Sequential) else module
        x = torch.randn(2, first.in_channels, 8, 8, generator=g)
        anchors_only = x * 30
        anchors_only[..., 0::2, 1::2] = 0  # a checkerboard context's second pass: the anchors known
        anchors_only[..., 1::2, 0::2] = 0
        leading_zeros = x.clone()
        leading_zeros[:, : first.in_channels // 4] = 0  # the parameter layers' first pass: no spatial context yet
        for inputs in (x, x * 1e4, anchors_only, leading_zeros, torch.zeros_like(x), x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(net(inputs), float64_reference(net, inputs))
            assert torch.equal(net(inputs[1:]), float64_reference(net, inputs[1:]))


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-mbt2018-mean"])
def test_containers_are_the_bytes_the_straightforward_evaluation_writes(preset_name, tiny_models, monkeypatch):
    """The bundled photos encode to the same strings and y_hat, and decode to the same y_hat, as
    with the straightforward float64 evaluation."""
    codec = tiny_models.codec if preset_name == "tiny" else build_codec(get_preset(preset_name))
    preset = get_preset(preset_name)
    photos = sorted(sample_photo().parent.glob("*.png"))
    x = torch.cat([pad_to_stride(to_tensor(resize_for_codec(load_image(p), "paper", preset.image_size)))[0] for p in photos])
    fast = [codec.analyze(x[i : i + 1]) for i in range(len(photos))]
    fast_decoded = [codec.entropy_decode(latents) for latents, _ in fast]
    with monkeypatch.context() as patch:
        patch.setattr(FixedPointNet, "__call__", float64_reference)
        reference = [codec.analyze(x[i : i + 1]) for i in range(len(photos))]
        reference_decoded = [codec.entropy_decode(latents) for latents, _ in reference]
    for (latents, y_hat), (ref_latents, ref_y_hat), decoded, ref_decoded in zip(fast, reference, fast_decoded, reference_decoded):
        assert latents.fixed_point and latents.strings == ref_latents.strings
        assert torch.equal(y_hat, ref_y_hat) and torch.equal(decoded, ref_decoded) and torch.equal(decoded, y_hat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_bits(tiny_models):
    cases = [(module, extreme_inputs(module, FixedPointNet(module))) for module in adversarial_nets().values()]
    cases += [(m, torch.randn(2, (m[0] if isinstance(m, nn.Sequential) else m).in_channels, 8, 8) * 20)
              for m in parameter_networks(tiny_models.codec.model)]
    for module, x in cases:
        net = FixedPointNet(module)
        cpu = net(x)
        assert torch.equal(net(x.cuda()).cpu(), cpu)
        assert torch.equal(float64_reference(net, x.cuda()).cpu(), cpu)
