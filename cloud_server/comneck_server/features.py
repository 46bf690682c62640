"""Cloud side of the data path: entropy-coded latents -> y_hat -> neck tokens -> CLIP tail features.

The image is never reconstructed: g_s does not run here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from comneck.bitstream import Bitstream
from comneck.clip_split import ClipFeatures
from comneck.codec import LATENT_STRIDE
from comneck.errors import ComneckInputError
from comneck.models import ComneckModels


@dataclass
class LatentFeatures:
    """Every intermediate of one request, with the time each step took."""

    y_hat: torch.Tensor
    tokens: torch.Tensor
    features: ClipFeatures
    timings_ms: dict[str, float]


class FeaturePipeline:
    """Entropy decode (CPU, float32), transform-neck and CLIP tail (the neck's device and dtype), each timed."""

    def __init__(self, models: ComneckModels) -> None:
        self.models = models

    def check_size(self, stream: Bitstream) -> None:
        """Refuse (``unsupported_size``) latents whose grid the neck was not built for, before decoding."""
        side = self.models.preset.neck.grid * LATENT_STRIDE
        if stream.latents.padded_size != (side, side):
            h, w = stream.image_size
            raise ComneckInputError(
                f"this gateway's neck takes a {side}x{side} codec input; the bitstream holds {w}x{h} "
                f"(padded {stream.latents.padded_size[1]}x{stream.latents.padded_size[0]}): encode with --resize paper",
                "unsupported_size",
            )

    def _clock(self) -> float:
        param = next(self.models.neck.parameters())
        if param.device.type == "cuda":
            torch.cuda.synchronize(param.device)  # time the kernels, not their launches
        return time.perf_counter()

    @torch.inference_mode()
    def __call__(self, stream: Bitstream, hidden_blocks: Iterable[int] = ()) -> LatentFeatures:
        stream.check_codec(self.models.preset.codec.arch, self.models.codec_fingerprint)
        self.check_size(stream)
        param = next(self.models.neck.parameters())
        t0 = self._clock()
        y_hat = self.models.codec.entropy_decode(stream.latents)
        t1 = self._clock()
        tokens = self.models.neck(y_hat.to(device=param.device, dtype=param.dtype))
        t2 = self._clock()
        features = self.models.clip.tail(tokens, hidden_blocks)
        t3 = self._clock()
        timings = {"entropy_decode": (t1 - t0) * 1e3, "neck": (t2 - t1) * 1e3, "clip_tail": (t3 - t2) * 1e3}
        return LatentFeatures(y_hat, tokens, features, timings)
