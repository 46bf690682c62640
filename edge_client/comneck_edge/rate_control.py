"""Rate control: each photo at the highest rate point whose container fits a byte budget.

A learned codec has a few rate points (the paper's four lambdas), each its own weights; a
container's size grows with the rate point. So the search is a binary search over the points,
highest first when it fits: at most ceil(log2(n)) + 1 encodes for n points (3 for four; 1 when
the highest fits). Fewer is not possible without predicting a container's size from another rate
point's, which nothing here can do exactly. The budget is ``--max-bytes`` or ``--target-bpp``
times the pixels the codec sees.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from comneck.bitstream import Source
from comneck.errors import ComneckInputError

from .encoded import ArrayEncoder, EncodedImage, encode_photo


class RatePoint(ArrayEncoder, Protocol):
    """What a rate point offers (:class:`~comneck_edge.encoder.EdgeEncoder`, :class:`~comneck_edge.onnx_edge.OnnxEdgeEncoder`)."""

    rate: int
    fixed_point: bool
    random_weights: bool

    @property
    def preset_name(self) -> str: ...


class RateLadder:
    """Rate points of one preset, lowest rate first; encodes each photo at the highest that fits."""

    def __init__(self, points: list[RatePoint], max_bytes: int | None = None, target_bpp: float | None = None) -> None:
        if (max_bytes is None) == (target_bpp is None):
            raise ComneckInputError("rate control takes one budget: --max-bytes or --target-bpp")
        if max_bytes is not None and max_bytes < 1:
            raise ComneckInputError(f"--max-bytes must be 1 or more, got {max_bytes}")
        if target_bpp is not None and not target_bpp > 0:
            raise ComneckInputError(f"--target-bpp must be a positive number of bits per pixel, got {target_bpp}")
        self.points = sorted(points, key=lambda p: p.rate)
        rates = [p.rate for p in self.points]
        if len(set(rates)) != len(rates):
            raise ComneckInputError(f"two rate points name the same rate ({', '.join(map(str, rates))}): give each rate's weights once "
                                    "(weights whose rate is unknown count as rate 1: convert them with --rate)")
        if len({p.preset_name for p in self.points}) > 1:
            raise ComneckInputError(f"rate points of different presets ({', '.join(sorted({p.preset_name for p in self.points}))}): "
                                    "give one preset's rate points")
        self.max_bytes, self.target_bpp = max_bytes, target_bpp
        top = self.points[-1]
        self.rate, self.resize, self.fixed_point = top.rate, top.resize, top.fixed_point
        self.random_weights = any(p.random_weights for p in self.points)

    @property
    def preset_name(self) -> str:
        return self.points[-1].preset_name

    @property
    def image_size(self) -> int:
        return self.points[-1].image_size

    def budget(self, height: int, width: int) -> int:
        """The byte budget of an image the codec sees at ``height`` x ``width``."""
        if self.max_bytes is not None:
            return self.max_bytes
        return math.floor(self.target_bpp * height * width / 8)

    def encode_file(self, source: str | Path | bytes) -> EncodedImage:
        """Decode a photo, apply the resize policy, encode at the highest rate point that fits."""
        return encode_photo(self, source)

    def encode_array(self, x: np.ndarray, source: Source | None = None) -> EncodedImage:
        """Encode one image [1, 3, H, W] at the highest rate point whose container fits the budget."""
        budget = self.budget(x.shape[-2], x.shape[-1])
        start = time.perf_counter()
        tried: dict[int, EncodedImage] = {}
        low, high, best = 0, len(self.points) - 1, None
        mid = high  # the highest point first (it fits most budgets), then the upper middle of what is left
        while low <= high:
            tried[mid] = self.points[mid].encode_array(x, source)
            if len(tried[mid].data) <= budget:
                best, low = mid, mid + 1
            else:
                high = mid - 1
            mid = (low + high + 1) // 2
        if best is None:
            smallest = tried[0]
            raise ComneckInputError(f"the smallest container of this photo is {len(smallest.data)} bytes (rate {smallest.bitstream.rate}), "
                                    f"above the budget of {budget} bytes: allow at least {len(smallest.data)} bytes")
        chosen = tried[best]
        chosen.rate_choice = (f"rate {chosen.bitstream.rate}: the highest of {', '.join(str(p.rate) for p in self.points)} within "
                              f"{budget} bytes ({len(tried)} encode{'s' if len(tried) > 1 else ''})")
        chosen.timings_ms = {"analysis_entropy_coding": (time.perf_counter() - start) * 1e3}
        return chosen
