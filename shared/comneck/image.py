"""Image in: decode a file, fix orientation, make RGB, resize for the codec, pad to the codec's stride.

Everything a user can get wrong here (a missing file, a file that is no image, an
empty image, a tensor with the wrong channel count) raises :class:`ComneckInputError`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from compressai.ops import compute_padding
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

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


def resize_for_codec(img: Image.Image, policy: ResizePolicy = "paper", size: int = 256) -> Image.Image:
    """Apply the resize policy.

    ``paper``: bicubic resize of the short side to ``size``, centre crop ``size`` x ``size``
    (the official code's codec input). ``pad-square``: the photo pasted at full resolution,
    centred at ((S - W) // 2, (S - H) // 2), on a square of side S = max(W, H) and CLIP's mean
    colour (LLaVA's expand2square), then that square bicubic-resized to ``size``: the whole photo
    survives and boxes map back exactly. ``pad-square-white``: the same on white (Shikra's
    Expand2square). ``stretch``: bicubic resize to ``size`` x ``size``, the aspect ratio not kept
    (Honeybee's processor). ``none``: unchanged.
    """
    if policy == "paper":
        img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
        return TF.center_crop(img, size)
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
    if policy == "paper":  # torchvision: short side to ``side``, long side truncated; centre crop rounded
        scale_w, scale_h = (side / w, int(side * h / w) / h) if w <= h else (int(side * w / h) / w, side / h)
        left, top = round((w * scale_w - side) / 2), round((h * scale_h - side) / 2)
        return [(x0 + left) / scale_w, (y0 + top) / scale_h, (x1 + left) / scale_w, (y1 + top) / scale_h]
    raise ComneckInputError(f"unknown resize policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [1, 3, H, W] in [0, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_image(x: torch.Tensor) -> Image.Image:
    """Float tensor [1, 3, H, W] in [0, 1] -> RGB PIL image (rounded to 8 bits)."""
    array = (x[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def check_image_tensor(x: torch.Tensor) -> None:
    """Refuse anything but a non-empty float batch [B, 3, H, W]."""
    if not isinstance(x, torch.Tensor):
        raise ComneckInputError(f"expected an image tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ComneckInputError(f"expected an image batch [B, 3, H, W], got shape {list(x.shape)}")
    if x.shape[1] != 3:
        raise ComneckInputError(f"expected 3 colour channels (RGB), got {x.shape[1]}")
    if 0 in x.shape:
        raise ComneckInputError(f"image batch is empty: shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ComneckInputError(f"expected a float image in [0, 1], got dtype {x.dtype}")


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
    """The symmetric padding that brings an image of this size to multiples of ``stride``."""
    pad, _ = compute_padding(height, width, min_div=stride)
    return Padding(*pad)


def pad_to_stride(x: torch.Tensor, stride: int = CODEC_STRIDE) -> tuple[torch.Tensor, Padding]:
    """Zero-pad [B, C, H, W] symmetrically to multiples of ``stride`` (CompressAI's convention)."""
    padding = padding_of(x.shape[-2], x.shape[-1], stride)
    pad = (padding.left, padding.right, padding.top, padding.bottom)
    return F.pad(x, pad, mode="constant", value=0.0), padding


def unpad(x: torch.Tensor, padding: Padding) -> torch.Tensor:
    """Crop a padded [B, C, H, W] back to the original size."""
    h, w = x.shape[-2], x.shape[-1]
    return x[..., padding.top : h - padding.bottom, padding.left : w - padding.right]


#: the photos bundled with the package
SAMPLE_PHOTOS = ("cow_beach.png", "chicken_on_money.png")


def sample_photo(name: str = SAMPLE_PHOTOS[0]) -> Path:
    """Path of a photo bundled with the package (one of ``SAMPLE_PHOTOS``)."""
    path = Path(__file__).parent / "assets" / name
    if not path.is_file():
        raise ComneckInputError(f"no bundled photo called {name!r}")
    return path
