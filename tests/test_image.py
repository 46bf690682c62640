import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from comneck.errors import ComneckInputError
from comneck.image import PAD_FILLS, check_image_tensor, frame_to_photo, load_image, resize_for_codec, sample_photo, to_tensor


def png_bytes(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def zero_width_png() -> bytes:
    """A PNG whose header declares a 0 x 4 image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_any_mode_becomes_rgb(mode):
    img = load_image(png_bytes(mode, (5, 7)))
    assert img.mode == "RGB" and img.size == (5, 7)
    assert to_tensor(img).shape == (1, 3, 7, 5)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_bundled_photo_and_paper_resize():
    img = load_image(sample_photo("chicken_on_money.png"))
    assert img.size == (640, 640)
    assert resize_for_codec(Image.new("RGB", (640, 480)), "paper").size == (256, 256)
    assert resize_for_codec(img, "none").size == (640, 640)
    for policy, fill in (("pad-square", (122, 116, 104)), ("pad-square-white", (255, 255, 255))):
        wide = resize_for_codec(Image.new("RGB", (640, 320), (255, 0, 0)), policy)  # type: ignore[arg-type]
        assert wide.size == (256, 256) and PAD_FILLS[policy] == fill
        assert wide.getpixel((128, 128)) == (255, 0, 0) and wide.getpixel((128, 10)) == fill  # 256x128 band in the middle
    stretched = resize_for_codec(Image.new("RGB", (640, 320), (255, 0, 0)), "stretch")
    assert stretched.size == (256, 256) and stretched.getextrema() == ((255, 255), (0, 0), (0, 0))  # no fill: all photo
    with pytest.raises(ComneckInputError, match="resize policy"):
        resize_for_codec(img, "squash")  # type: ignore[arg-type]


def test_paper_resize_for_the_336_presets_codec_input():
    # short side to 384 (800x400 -> 768x384), then the centre 384x384: the red middle stays, the blue sides go
    img = Image.new("RGB", (800, 400), (0, 0, 255))
    img.paste((255, 0, 0), (150, 0, 650, 400))
    out = resize_for_codec(img, "paper", 384)
    assert out.size == (384, 384)
    assert out.getextrema() == ((255, 255), (0, 0), (0, 0))
    assert resize_for_codec(img, "pad-square", 384).size == (384, 384)


@pytest.mark.parametrize(
    "source, message",
    [
        (b"this is not an image", "not a readable image"),
        (b"", "not a readable image"),
        (zero_width_png(), "image"),
    ],
    ids=["text", "empty-bytes", "zero-size"],
)
def test_bad_image_bytes_are_refused(source, message):
    with pytest.raises(ComneckInputError, match=message):
        load_image(source)


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(ComneckInputError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ComneckInputError, match="directory"):
        load_image(tmp_path)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(ComneckInputError, match="not a readable image"):
        load_image(text)


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.rand(1, 4, 8, 8), "3 colour channels"),
        (torch.rand(1, 1, 8, 8), "3 colour channels"),
        (torch.rand(3, 8, 8), r"\[B, 3, H, W\]"),
        (torch.rand(1, 3, 0, 8), "empty"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float"),
    ],
)
def test_bad_tensors_are_refused(tensor, message):
    with pytest.raises(ComneckInputError, match=message):
        check_image_tensor(tensor)


@pytest.mark.parametrize("policy", ["paper", "pad-square", "pad-square-white", "stretch"])
@pytest.mark.parametrize("width, height", [(640, 480), (640, 427), (427, 640), (300, 500), (333, 333), (900, 97)])
def test_frame_to_photo_inverts_the_resize_policy(policy, width, height):
    """A blue rectangle drawn on a white photo (inside the centre square, which every policy
    keeps), found again in the codec input, maps back to where it was within one codec pixel."""
    m = min(width, height)
    box = [round(width / 2 - 0.3 * m), round(height / 2 - 0.15 * m), round(width / 2 + 0.1 * m), round(height / 2 + 0.25 * m)]
    photo = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(photo).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(0, 0, 255))  # inclusive ends
    framed = np.asarray(resize_for_codec(photo, policy, 256)).astype(int)
    ys, xs = np.nonzero(framed[..., 2] - framed[..., 0] > 127)  # more than half blue: white is 0, CLIP's mean -18
    found = [xs.min() / 256, ys.min() / 256, (xs.max() + 1) / 256, (ys.max() + 1) / 256]
    back = frame_to_photo(found, (height, width), policy, 256)
    tolerance = max(width, height) / 256  # one codec-input pixel in the photo's pixels
    assert all(abs(a - b) <= tolerance for a, b in zip(back, box)), (back, box)


def expand2square_then_resize(photo: Image.Image, fill: tuple[int, int, int], size: int) -> Image.Image:
    """Shikra's Expand2square (mllm/dataset/utils/transform.py), LLaVA's expand2square with CLIP's
    mean colour, written out: a square photo as it is; a wide one pasted at (0, (W - H) // 2) on a
    W x W square of ``fill``, a tall one at ((H - W) // 2, 0) on H x H; then a bicubic resize."""
    w, h = photo.size
    square = photo
    if w != h:
        square = Image.new("RGB", (max(w, h), max(w, h)), fill)
        square.paste(photo, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return square.resize((size, size), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("policy, fill", [("pad-square-white", (255, 255, 255)), ("pad-square", (122, 116, 104))])
@pytest.mark.parametrize("width, height", [(640, 427), (427, 640), (500, 500), (301, 40)])
def test_pad_square_frames_as_expand2square_does(policy, fill, width, height):
    """Pixel for pixel the official padding at full size, then the square resized to the codec's."""
    noise = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    photo = Image.fromarray(noise, mode="RGB")
    ours = np.asarray(resize_for_codec(photo, policy, 256))
    assert ours.shape == (256, 256, 3)
    assert np.array_equal(ours, np.asarray(expand2square_then_resize(photo, fill, 256)))
