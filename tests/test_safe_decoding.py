"""Entropy decoding of untrusted containers: inside its buffers, a pure function of the bytes,
refusing streams that do not hold exactly the grid's symbols (comneck.safe_decoding)."""

import copy
import dataclasses
import random

import pytest
import torch

from comneck.bitstream import Bitstream
from comneck.codec import EncodedLatents
from comneck.errors import ComneckInputError
from comneck.image import load_image, resize_for_codec, sample_photo, to_tensor
from comneck.presets import PRESETS
from comneck_edge import EdgeEncoder

PHOTOS = sorted(sample_photo().parent.glob("*.png"))


@pytest.fixture(scope="module")
def encoder(tiny):
    return EdgeEncoder(tiny)


@pytest.fixture(scope="module")
def stream(encoder):
    return encoder.encode_file(sample_photo()).bitstream


def with_streams(stream: Bitstream, strings: list[list[bytes]], size: tuple[int, int] | None = None) -> Bitstream:
    """The container with other streams (and image size), CRC recomputed: what any client can send."""
    image = size or stream.image_size
    padded = tuple(-(-side // 64) * 64 for side in image)
    return Bitstream.from_bytes(dataclasses.replace(stream, image_size=image, latents=EncodedLatents(strings, padded)).to_bytes())


def refused(codec, stream: Bitstream) -> str:
    with pytest.raises(ComneckInputError) as info:
        codec.entropy_decode(stream.latents)
    return info.value.code


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_valid_streams_decode_to_the_encoders_latents_exactly(preset):
    encoder = EdgeEncoder(PRESETS[preset])
    for photo in PHOTOS:
        encoded = encoder.encode_file(photo)
        _, y_edge = encoder.codec.analyze(to_tensor(resize_for_codec(load_image(photo), "paper")))
        assert torch.equal(encoder.codec.entropy_decode(Bitstream.from_bytes(encoded.data).latents), y_edge)


def test_a_self_consistent_header_for_a_larger_image_is_refused_not_a_crash(encoder, stream):
    # the container: 256x256 streams under a header claiming 4095x256 (padded 4096x256)
    big = with_streams(stream, stream.latents.strings, (4095, 256))
    assert big.latents.padded_size == (4096, 256)
    assert refused(encoder.codec, big) == "corrupt_bitstream"


def altered(stream: Bitstream, cut: str) -> Bitstream:
    """``stream`` with one kind of damage a client can send."""
    strings = [list(s) for s in stream.latents.strings]
    rng = random.Random(cut)
    z = strings[-1][0]
    y0 = max((s[0] for s in strings[:-1]), key=len)
    k = [s[0] for s in strings].index(y0)
    if cut == "z one byte":
        strings[-1] = [z[:1]]
    elif cut == "z random":
        strings[-1] = [rng.randbytes(len(z))]
    elif cut == "z zeros":
        strings[-1] = [bytes(len(z))]
    elif cut == "y truncated":
        strings[k] = [y0[: len(y0) // 2]]
    elif cut == "y random":
        strings[k] = [rng.randbytes(len(y0))]
    elif cut == "swapped":  # the two passes of the largest group (smaller groups may hold only the 8-byte state)
        i = max(range(len(strings) - 1), key=lambda k: len(strings[k][0])) // 2 * 2
        assert strings[i] != strings[i + 1]
        strings[i], strings[i + 1] = strings[i + 1], strings[i]
    else:
        strings[k] = [y0 + b"\x00\x00\x00\x00"]
    return with_streams(stream, strings)


@pytest.mark.parametrize("cut", ["z one byte", "z random", "z zeros", "y truncated", "y random", "y extended"])
def test_cut_and_altered_streams_are_refused_the_same_way_every_time(encoder, stream, cut):
    damaged = altered(stream, cut)
    assert {refused(encoder.codec, damaged) for _ in range(3)} == {"corrupt_bitstream"}


def test_swapped_passes_decode_the_same_every_time(encoder, stream):
    """Two passes coded with the same tables (random weights make many alike) swap into another valid
    stream: it decodes, always to the same latents; with other tables it would be refused."""
    swapped = altered(stream, "swapped")
    first = encoder.codec.entropy_decode(swapped.latents)
    assert not torch.equal(first, encoder.codec.entropy_decode(stream.latents))
    assert all(torch.equal(first, encoder.codec.entropy_decode(swapped.latents)) for _ in range(3))


def test_the_checks_stay_on_in_copies_and_do_not_leak_into_encoding(encoder, stream):
    clone = copy.deepcopy(encoder.codec)  # a copied entropy model comes with CompressAI's plain coder
    assert torch.equal(clone.entropy_decode(stream.latents), encoder.codec.entropy_decode(stream.latents))
    assert refused(clone, with_streams(stream, [*stream.latents.strings[:-1], [b"\x01" * 8]])) == "corrupt_bitstream"
    # encoding after a refused decode writes the same bytes as before
    again = encoder.encode_file(sample_photo())
    assert again.bitstream.latents.strings == stream.latents.strings


def test_a_flipped_fixed_point_flag_decodes_to_other_latents_as_the_docs_say(encoder, stream):
    """docs/bitstream.md: the CRC catches accidental corruption; a deliberately flipped flag (CRC
    recomputed) is not detected, and decodes with the other entropy-parameter arithmetic to other latents."""
    flipped = Bitstream.from_bytes(dataclasses.replace(stream, latents=dataclasses.replace(stream.latents, fixed_point=False)).to_bytes())
    assert stream.latents.fixed_point and not flipped.latents.fixed_point
    original, altered_y = encoder.codec.entropy_decode(stream.latents), encoder.codec.entropy_decode(flipped.latents)
    assert altered_y.shape == original.shape and not torch.equal(altered_y, original)
    assert (altered_y - original).abs().max() < 1.0  # the same symbols, other means: no error, other latents
    with pytest.raises(ComneckInputError) as info:  # the same flip without the CRC recomputed: refused
        Bitstream.from_bytes(flipped.to_bytes()[:-4] + stream.to_bytes()[-4:])
    assert info.value.code == "crc_mismatch"
