"""Edge side of the data path: photo -> preprocessed tensor -> entropy-coded latents."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from comneck.bitstream import Bitstream, Source
from comneck.image import ResizePolicy, check_image_tensor, pad_to_stride
from comneck.models import build_codec, codec_rate
from comneck.presets import Preset, get_preset

from .encoded import EncodedImage, encode_photo


class EdgeEncoder:
    """Runs ELIC's analysis half and the entropy coder for one preset and rate point."""

    def __init__(
        self, preset: str | Preset = "tiny", rate: int | None = None, resize: ResizePolicy = "paper", codec_weights: str | Path | None = None,
        fixed_point: bool = True,
    ) -> None:
        """``rate`` defaults to the rate index the codec weights were trained for (1 if unknown);
        one that contradicts the weights is refused, since the container would misreport it.
        ``fixed_point`` picks the entropy parameters' evaluation (:meth:`LearnedCodec.analyze`)."""
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.resize = resize
        self.fixed_point = fixed_point
        self.codec = build_codec(self.preset, codec_weights)
        self.rate = codec_rate(self.codec, rate)
        self.fingerprint = self.codec.fingerprint()
        self.random_weights = codec_weights is None

    @property
    def preset_name(self) -> str:
        return self.preset.name

    @property
    def image_size(self) -> int:
        return self.preset.image_size

    def encode_file(self, source: str | Path | bytes) -> EncodedImage:
        """Decode a photo, apply the resize policy, encode; the container records the photo's
        size and the policy, so a gateway can map boxes back to the photo."""
        return encode_photo(self, source)

    def encode_array(self, x: np.ndarray, source: Source | None = None) -> EncodedImage:
        """:meth:`encode_tensor` of a float32 array [1, 3, H, W] (what the ONNX edge and rate control pass)."""
        return self.encode_tensor(torch.from_numpy(x), source)

    def encode_tensor(self, x: torch.Tensor, source: Source | None = None) -> EncodedImage:
        """Encode one image [1, 3, H, W] in [0, 1]; it is padded to multiples of 64 first.
        ``source``: the photo it was made from, recorded in the container when given."""
        check_image_tensor(x)
        start = time.perf_counter()
        padded, _ = pad_to_stride(x)
        latents, _ = self.codec.analyze(padded, self.fixed_point)
        stream = Bitstream(self.codec.config.arch, self.rate, self.fingerprint, (x.shape[-2], x.shape[-1]), latents, source)
        data = stream.to_bytes()
        elapsed = (time.perf_counter() - start) * 1e3
        return EncodedImage(stream, data, {"analysis_entropy_coding": elapsed})


def encode(
    photo: str | Path | bytes, preset: str | Preset = "tiny", rate: int | None = None, resize: ResizePolicy = "paper",
    codec_weights: str | Path | None = None, fixed_point: bool = True,
) -> bytes:
    """A photo (path or file bytes) -> the ComNeck container to send to a gateway (docs/bitstream.md).

    The codec is built once per process for each preset, weights (as they are on disk now: a
    changed file is read again) and settings, and kept for the calls after it.
    """
    chosen = get_preset(preset) if isinstance(preset, str) else preset
    weights = Path(codec_weights).resolve() if codec_weights is not None else None
    return _kept_encoder(chosen, rate, resize, weights, _stamp(weights), fixed_point).encode_file(photo).data


def _stamp(weights: Path | None) -> tuple[tuple[str, int, int], ...]:
    """What identifies the weights' current contents cheaply: each file's name, size and mtime."""
    if weights is None or not weights.exists():
        return ()
    files = sorted(p for p in weights.iterdir() if p.is_file()) if weights.is_dir() else [weights]
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@lru_cache(maxsize=8)
def _kept_encoder(preset: Preset, rate: int | None, resize: ResizePolicy, weights: Path | None,
                  stamp: tuple[tuple[str, int, int], ...], fixed_point: bool) -> EdgeEncoder:
    """:func:`encode`'s encoders, one per key (``stamp`` is part of it: changed weights make a new one)."""
    return EdgeEncoder(preset, rate, resize, weights, fixed_point)
