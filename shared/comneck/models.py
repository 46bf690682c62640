"""Build a preset's networks with reproducible weights.

Until a checkpoint is loaded, weights are random but seeded: the edge device and the
gateway, building the same preset separately, get identical codecs, so real
bitstreams decode. Every consumer can ask :attr:`ComneckModels.random_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .codec import ElicCodec
from .presets import Preset

RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS (no checkpoint loaded): outputs show the data path works, not model quality"


def seeded(seed: int, build: type[nn.Module], *args: object) -> nn.Module:
    """Construct ``build(*args)`` under a private RNG seeded with ``seed``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args).eval()


def build_codec(preset: Preset) -> ElicCodec:
    """The preset's ELIC with seeded random weights and entropy tables built."""
    codec = seeded(preset.seed, ElicCodec, preset.codec)
    codec.update_entropy_tables()
    return codec


@dataclass
class ComneckModels:
    """The cloud side's networks for one preset."""

    preset: Preset
    codec: ElicCodec
    neck: nn.Module
    clip: nn.Module
    random_weights: bool = True
    codec_fingerprint: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.codec_fingerprint = self.codec.fingerprint()


def build_cloud_models(preset: Preset) -> ComneckModels:
    """Codec, neck and CLIP split of a preset (seeded random weights)."""
    from .clip_split import ClipSplit, build_clip
    from .neck import TransformNeck

    neck = seeded(preset.seed + 1, TransformNeck, preset.neck)
    clip = seeded(preset.seed + 2, build_clip, preset.clip)
    split = ClipSplit(clip.visual, preset.split_block).eval()
    return ComneckModels(preset, build_codec(preset), neck, split)
