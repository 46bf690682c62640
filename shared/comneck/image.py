"""Image tensors: the torch side of :mod:`comneck.photo` (photo -> tensor, padding, checks).

The photo handling itself (decode, orientation, resize policies, padding geometry) lives in
:mod:`comneck.photo`, which needs no torch; its names are importable from here too.
Everything a user can get wrong here (a tensor with the wrong channel count, ...) raises
:class:`ComneckInputError`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ComneckInputError
from .photo import (
    CODEC_STRIDE,
    PAD_FILLS,
    SAMPLE_PHOTOS,
    Padding,
    ResizePolicy,
    frame_to_photo,
    load_image,
    padding_of,
    resize_for_codec,
    sample_photo,
    to_array,
)

#: This module's own names and the photo names it re-exports (callers on the torch side import them from here).
__all__ = ["CODEC_STRIDE", "PAD_FILLS", "SAMPLE_PHOTOS", "Padding", "ResizePolicy", "check_image_tensor", "frame_to_photo", "load_image",
           "pad_to_stride", "padding_of", "resize_for_codec", "sample_photo", "to_image", "to_tensor", "unpad"]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [1, 3, H, W] in [0, 1]."""
    return torch.from_numpy(to_array(img))


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


def pad_to_stride(x: torch.Tensor, stride: int = CODEC_STRIDE) -> tuple[torch.Tensor, Padding]:
    """Zero-pad [B, C, H, W] symmetrically to multiples of ``stride`` (CompressAI's convention)."""
    padding = padding_of(x.shape[-2], x.shape[-1], stride)
    pad = (padding.left, padding.right, padding.top, padding.bottom)
    return F.pad(x, pad, mode="constant", value=0.0), padding


def unpad(x: torch.Tensor, padding: Padding) -> torch.Tensor:
    """Crop a padded [B, C, H, W] back to the original size."""
    h, w = x.shape[-2], x.shape[-1]
    return x[..., padding.top : h - padding.bottom, padding.left : w - padding.right]
