"""What both edges (torch and ONNX) hand back for a photo, and the photo preparation they share:
no torch here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from comneck.bitstream import Bitstream, Source
from comneck.photo import ResizePolicy, load_image, resize_for_codec, to_array


@dataclass
class EncodedImage:
    """One image's bitstream (parsed and serialised) and how long encoding took."""

    bitstream: Bitstream
    data: bytes  # the container as sent: docs/bitstream.md
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: With rate control (comneck_edge.rate_control): which rate point was chosen, and why.
    rate_choice: str | None = None

    @property
    def bpp(self) -> float:
        """Bits per pixel of the image the codec saw, from the container's real byte count."""
        h, w = self.bitstream.image_size
        return 8.0 * len(self.data) / (h * w)

    @property
    def entropy_params(self) -> str:
        """How the container's entropy parameters were computed: ``fixed-point`` or ``float``."""
        return "fixed-point" if self.bitstream.latents.fixed_point else "float"


def prepare_photo(source: str | Path | bytes, resize: ResizePolicy, size: int) -> tuple[np.ndarray, Source, float]:
    """Decode a photo and apply the resize policy -> (image [1, 3, H, W] float32 in [0, 1], the
    photo's size and policy for the container, milliseconds taken)."""
    start = time.perf_counter()
    photo = load_image(source)
    x = to_array(resize_for_codec(photo, resize, size))
    return x, Source((photo.height, photo.width), resize), (time.perf_counter() - start) * 1e3


class ArrayEncoder(Protocol):
    """An edge encoder of prepared images (the torch edge, the ONNX edge, a rate ladder)."""

    resize: ResizePolicy

    @property
    def image_size(self) -> int: ...

    def encode_array(self, x: np.ndarray, source: Source | None = None) -> EncodedImage: ...


def encode_photo(encoder: ArrayEncoder, source: str | Path | bytes) -> EncodedImage:
    """Decode a photo, apply the encoder's resize policy, encode; the container records the
    photo's size and the policy, so a gateway can map boxes back to the photo."""
    x, photo, prep_ms = prepare_photo(source, encoder.resize, encoder.image_size)
    encoded = encoder.encode_array(x, photo)
    encoded.timings_ms = {"preprocess": prep_ms, **encoded.timings_ms}
    return encoded
