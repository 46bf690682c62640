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
from comneck.models import ComneckModels


@dataclass
class LatentFeatures:
    """Every intermediate of one request, with the time each step took."""

    y_hat: torch.Tensor
    tokens: torch.Tensor
    features: ClipFeatures
    timings_ms: dict[str, float]


class FeaturePipeline:
    """Entropy decode, transform-neck and CLIP tail, each timed."""

    def __init__(self, models: ComneckModels) -> None:
        self.models = models

    @torch.inference_mode()
    def __call__(self, stream: Bitstream, hidden_blocks: Iterable[int] = ()) -> LatentFeatures:
        stream.check_codec(self.models.preset.codec.arch, self.models.codec_fingerprint)
        clock = time.perf_counter
        t0 = clock()
        y_hat = self.models.codec.entropy_decode(stream.latents)
        t1 = clock()
        tokens = self.models.neck(y_hat)
        t2 = clock()
        features = self.models.clip.tail(tokens, hidden_blocks)
        t3 = clock()
        timings = {"entropy_decode": (t1 - t0) * 1e3, "neck": (t2 - t1) * 1e3, "clip_tail": (t3 - t2) * 1e3}
        return LatentFeatures(y_hat, tokens, features, timings)
