import dataclasses

import pytest
import torch

from comneck.bitstream import CODEC_IDS, MAGIC, RESIZE_IDS, SOURCE_FLAG, Bitstream, BitstreamError, Source
from comneck.image import sample_photo
from comneck.models import build_codec
from comneck_edge import EdgeEncoder


@pytest.fixture(scope="module")
def stream(tiny):
    encoded = EdgeEncoder(tiny, rate=3).encode_file(sample_photo())
    assert encoded.data == encoded.bitstream.to_bytes()
    assert encoded.bpp == 8 * len(encoded.data) / 256**2
    return encoded.bitstream


def test_round_trip_keeps_every_field_and_decodes(stream, tiny_models):
    data = stream.to_bytes()
    assert data.startswith(MAGIC)
    back = Bitstream.from_bytes(data)
    assert back == stream
    assert back.latents.strings == stream.latents.strings
    torch.testing.assert_close(
        tiny_models.codec.entropy_decode(back.latents), tiny_models.codec.entropy_decode(stream.latents), rtol=0, atol=0
    )


def test_overhead_is_small_and_below_compressai_example_container(stream):
    n = len(stream.latents.strings)
    compressai_example = 2 + 4 * 2 + 4 * 3 + 4 * n  # header, original size, shape + count, a uint32 per length
    assert stream.overhead_bytes == len(stream.to_bytes()) - stream.latents.num_bytes
    assert stream.overhead_bytes < compressai_example
    source = 2 * 2 + 1 if stream.source else 0  # the photo's size (two varints up to 16383) and the policy byte
    assert stream.overhead_bytes <= 16 + 4 + 2 * 4 + source + 1 + 2 * n  # header, CRC, sizes, source, count, lengths


def test_fingerprint_follows_the_weights(tiny):
    a, b = build_codec(tiny), build_codec(tiny)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 8
    with torch.no_grad():
        next(b.model.g_s.parameters()).view(-1)[0] += 1e-6
    assert a.fingerprint() != b.fingerprint()


def rebuilt(stream: Bitstream, **changes) -> bytes:
    return dataclasses.replace(stream, **changes).to_bytes()


def test_each_kind_of_bad_container_has_its_own_code(stream):
    data = stream.to_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    wrong_version = bytearray(data)
    wrong_version[4] = 9
    padded = stream.latents.padded_size
    cases = {
        "bad_magic": [b"", b"GIF89a" + bytes(40), b"\x89PNG\r\n\x1a\n" + bytes(100)],
        "truncated": [data[:3], data[:10], data[:20], data[:-4], data[: len(data) // 2]],
        "unsupported_version": [bytes(wrong_version)],
        "crc_mismatch": [bytes(flipped)],
        "corrupted": [data[:-4] + b"\x00" + data[-4:]],
        "bad_rate": [rebuilt(stream, rate=9)],
        "bad_size": [
            rebuilt(stream, source=Source((0, 10), "paper")),
            rebuilt(stream, image_size=(100_000, 64), latents=dataclasses.replace(stream.latents, padded_size=(100_032, 64))),
            rebuilt(stream, image_size=(0, 256)),
            rebuilt(stream, latents=dataclasses.replace(stream.latents, padded_size=(padded[0] + 64, padded[1]))),
        ],
    }
    for code, blobs in cases.items():
        for blob in blobs:
            with pytest.raises(BitstreamError) as info:
                Bitstream.from_bytes(blob)
            assert info.value.code == code, str(info.value)


def test_unknown_codec_id_with_a_valid_checksum(stream, monkeypatch):
    monkeypatch.setitem(CODEC_IDS, "future-codec", 7)
    blob = rebuilt(stream, codec="future-codec")
    monkeypatch.delitem(CODEC_IDS, "future-codec")
    with pytest.raises(BitstreamError) as info:
        Bitstream.from_bytes(blob)
    assert info.value.code == "unknown_codec"


def test_max_side_is_configurable(stream):
    with pytest.raises(BitstreamError, match="outside 1..128"):
        Bitstream.from_bytes(stream.to_bytes(), max_side=128)


def test_the_photo_behind_the_image_round_trips_and_old_containers_have_none(stream, monkeypatch):
    assert stream.source == Source((224, 224), "paper")  # the bundled cow photo, framed by the default policy
    data = stream.to_bytes()
    assert data[5] & SOURCE_FLAG and Bitstream.from_bytes(data).source == stream.source
    for policy in RESIZE_IDS:
        assert Bitstream.from_bytes(rebuilt(stream, source=Source((7, 70_000), policy))).source == Source((7, 70_000), policy)
    old = rebuilt(stream, source=None)  # as edges before the field wrote it
    assert not old[5] & SOURCE_FLAG and len(old) == len(data) - 5 and Bitstream.from_bytes(old).source is None
    monkeypatch.setitem(RESIZE_IDS, "stretch", 9)
    unknown = rebuilt(stream, source=Source((224, 224), "stretch"))
    with pytest.raises(BitstreamError) as info:
        Bitstream.from_bytes(unknown)
    assert info.value.code == "corrupted" and "resize policy 9" in str(info.value)
