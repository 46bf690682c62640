"""Photos in, without PyTorch: decode a file, fix orientation, make RGB, resize for the codec, and
the padding geometry to the codec's stride.

Both edges use it: the torch edge (through :mod:`comneck.image`) and the ONNX edge, which must
not import torch. Everything a user can get wrong here (a missing file, a file that is no image,
an empty image) raises :class:`ComneckInputError`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ComneckInputError
from .presets import RESIZE_POLICIES

ResizePolicy = Literal["paper", "pad-square", "pad-square-white", "none", "stretch"]
#: Fill of each padding policy: CLIP's mean colour, as LLaVA's expand2square pads; white, as
#: Shikra's Expand2square pads.
PAD_FILLS: dict[str, tuple[int, int, int]] = {"pad-square": (122, 116, 104), "pad-square-white": (255, 255, 255)}

#: ELIC downsamples by 16 (g_a) and 4 more (h_a): inputs must be multiples of 64.
CODEC_STRIDE = 64


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode an image file (path or bytes) to an RGB PIL image, EXIF orientation applied."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
    except FileNotFoundError:
        raise ComneckInputError(f"no such file: {source}") from None
    except IsADirectoryError:
        raise ComneckInputError(f"{source} is a directory, not an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        name = "the given bytes" if isinstance(source, bytes) else str(source)
        raise ComneckInputError(f"{name} is not a readable image ({type(exc).__name__})") from None
    if img.width == 0 or img.height == 0:
        raise ComneckInputError(f"image has zero size ({img.width}x{img.height})")
    return ImageOps.exif_transpose(img).convert("RGB")


def _square_offset(width: int, height: int) -> tuple[int, int]:
    """Where Shikra's and LLaVA's expand2square paste a ``width`` x ``height`` photo on its square
    of side max(W, H): (left, top), centred with floor division, so boxes map back exactly."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2


def _short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``resize(img, size)`` output (W, H): the short side ``size``, the long side
    scaled and truncated (its ``_compute_resized_output_size``)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_for_codec(img: Image.Image, policy: ResizePolicy = "paper", size: int = 256) -> Image.Image:
    """Apply the resize policy.

    ``paper``: bicubic resize of the short side to ``size``, centre crop ``size`` x ``size``
    (the official code's codec input, torchvision's ``Resize`` + ``CenterCrop`` on a PIL image,
    written with PIL alone so the ONNX edge needs no torch; tests/test_photo.py compares them).
    ``pad-square``: the photo pasted at full resolution, centred at ((S - W) // 2, (S - H) // 2),
    on a square of side S = max(W, H) and CLIP's mean colour (LLaVA's expand2square), then that
    square bicubic-resized to ``size``: the whole photo survives and boxes map back exactly.
    ``pad-square-white``: the same on white (Shikra's Expand2square). ``stretch``: bicubic resize
    to ``size`` x ``size``, the aspect ratio not kept (Honeybee's processor). ``none``: unchanged.
    """
    if policy == "paper":
        new_size = _short_side_size(img.width, img.height, size)
        if new_size != img.size:
            img = img.resize(new_size, Image.Resampling.BICUBIC)
        left, top = int(round((img.width - size) / 2.0)), int(round((img.height - size) / 2.0))
        return img.crop((left, top, left + size, top + size))
    if policy in PAD_FILLS:
        side = max(img.width, img.height)
        square = Image.new("RGB", (side, side), PAD_FILLS[policy])
        square.paste(img, _square_offset(img.width, img.height))
        return square.resize((size, size), Image.Resampling.BICUBIC)
    if policy == "stretch":
        return img.resize((size, size), Image.Resampling.BICUBIC)
    if policy == "none":
        return img
    raise ComneckInputError(f"unknown resize policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")


def frame_to_photo(box: list[float], photo_size: tuple[int, int], policy: ResizePolicy, side: int) -> list[float]:
    """A box [x0, y0, x1, y1] normalised to the ``side`` x ``side`` codec input -> pixels of the
    photo of ``photo_size`` (H, W) that :func:`resize_for_codec` turned into that input: the
    inverse of its scale and of its crop (``paper``) or padding (``pad-square*``).

    It needs only the exact geometry recorded in the container (:class:`comneck.bitstream.Source`:
    the photo's size and the policy) and the codec side. For ``pad-square*``, as Shikra maps its
    boxes back: the box times S = max(W, H), less the offset ((S - W) // 2, (S - H) // 2)."""
    h, w = photo_size
    if policy in PAD_FILLS:
        s = max(w, h)
        left, top = _square_offset(w, h)
        return [box[0] * s - left, box[1] * s - top, box[2] * s - left, box[3] * s - top]
    x0, y0, x1, y1 = (v * side for v in box)
    if policy in ("none", "stretch"):
        return [x0 * w / side, y0 * h / side, x1 * w / side, y1 * h / side]
    if policy == "paper":  # short side to ``side``, long side truncated; centre crop rounded
        new_w, new_h = _short_side_size(w, h, side)
        scale_w, scale_h = new_w / w, new_h / h
        left, top = round((w * scale_w - side) / 2), round((h * scale_h - side) / 2)
        return [(x0 + left) / scale_w, (y0 + top) / scale_h, (x1 + left) / scale_w, (y1 + top) / scale_h]
    raise ComneckInputError(f"unknown resize policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 array [1, 3, H, W] in [0, 1] (what :func:`comneck.image.to_tensor` holds)."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


@dataclass(frozen=True)
class Padding:
    """Where an image was padded, so the original size can be restored exactly."""

    left: int
    right: int
    top: int
    bottom: int

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        return height + self.top + self.bottom, width + self.left + self.right


def padding_of(height: int, width: int, stride: int = CODEC_STRIDE) -> Padding:
    """The symmetric padding that brings an image of this size to multiples of ``stride``
    (CompressAI's ``compute_padding``: the odd pixel goes right and bottom)."""
    out_h, out_w = -(-height // stride) * stride, -(-width // stride) * stride
    left, top = (out_w - width) // 2, (out_h - height) // 2
    return Padding(left, out_w - width - left, top, out_h - height - top)


def pad_array(x: np.ndarray, stride: int = CODEC_STRIDE) -> tuple[np.ndarray, Padding]:
    """Zero-pad [B, C, H, W] symmetrically to multiples of ``stride`` (as :func:`comneck.image.pad_to_stride`)."""
    p = padding_of(x.shape[-2], x.shape[-1], stride)
    return np.pad(x, ((0, 0), (0, 0), (p.top, p.bottom), (p.left, p.right))), p


#: the photos bundled with the package
SAMPLE_PHOTOS = ("cow_beach.png", "chicken_on_money.png")


def sample_photo(name: str = SAMPLE_PHOTOS[0]) -> Path:
    """Path of a photo bundled with the package (one of ``SAMPLE_PHOTOS``)."""
    path = Path(__file__).parent / "assets" / name
    if not path.is_file():
        raise ComneckInputError(f"no bundled photo called {name!r}")
    return path
