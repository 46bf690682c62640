"""Build a preset's networks: seeded random weights, or weight files where given.

Random weights are seeded, so the edge device and the gateway, building the same
preset separately, get identical codecs and real bitstreams decode. Every consumer can
ask which parts are random (:attr:`ComneckModels.random_parts`) and must say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_into, read_state_dict
from .codec import ElicCodec
from .presets import Preset

RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS (no checkpoint loaded): outputs show the data path works, not model quality"


def random_weights_note(parts: tuple[str, ...]) -> str:
    """The warning every output carries while ``parts`` (codec, neck, clip) hold random weights."""
    if not parts:
        return "trained weights loaded for codec, neck and CLIP"
    return RANDOM_WEIGHTS_NOTE.replace("no checkpoint loaded", f"no checkpoint loaded for {', '.join(parts)}")


def seeded(seed: int, build: type[nn.Module], *args: object) -> nn.Module:
    """Construct ``build(*args)`` under a private RNG seeded with ``seed``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args).eval()


def build_codec(preset: Preset, weights: str | Path | None = None) -> ElicCodec:
    """The preset's ELIC, from a weight file (CompressAI keys) or seeded, with entropy tables built."""
    codec = seeded(preset.seed, ElicCodec, preset.codec)
    if weights is not None:
        load_into(codec.model, read_state_dict(weights, "codec"), "codec")
    codec.apply_context_masks()
    codec.update_entropy_tables()
    return codec


@dataclass(frozen=True)
class WeightFiles:
    """Optional safetensors files (layouts in :mod:`comneck.checkpoints`); None means seeded random."""

    codec: Path | None = None
    neck: Path | None = None
    clip: Path | None = None


@dataclass
class ComneckModels:
    """The cloud side's networks for one preset."""

    preset: Preset
    codec: ElicCodec
    neck: nn.Module
    clip_model: nn.Module  # the whole open_clip CLIP: backends may use its text tower
    clip: nn.Module  # ClipSplit over clip_model.visual
    random_parts: tuple[str, ...] = ("codec", "neck", "clip")

    def __post_init__(self) -> None:
        self.codec_fingerprint = self.codec.fingerprint()

    @property
    def random_weights(self) -> bool:
        return bool(self.random_parts)

    @property
    def note(self) -> str:
        return random_weights_note(self.random_parts)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "ComneckModels":
        """Move the neck and CLIP; the codec stays on the CPU in float32, where the edge coded,
        because entropy decoding must repeat the encoder's arithmetic exactly."""
        self.neck.to(device=device, dtype=dtype)
        self.clip_model.to(device=device, dtype=dtype)
        return self


def build_cloud_models(preset: Preset, weights: WeightFiles = WeightFiles()) -> ComneckModels:
    """Codec, neck and CLIP split of a preset, from weight files where given."""
    from .clip_split import ClipSplit, build_clip
    from .neck import TransformNeck

    neck = seeded(preset.seed + 1, TransformNeck, preset.neck)
    clip = seeded(preset.seed + 2, build_clip, preset.clip)
    if weights.neck is not None:
        load_into(neck, read_state_dict(weights.neck, "neck"), "neck")
    if weights.clip is not None:
        load_into(clip, read_state_dict(weights.clip, "clip"), "clip")
    random_parts = tuple(part for part in ("codec", "neck", "clip") if getattr(weights, part) is None)
    split = ClipSplit(clip.visual, preset.split_block).eval()
    return ComneckModels(preset, build_codec(preset, weights.codec), neck, clip, split, random_parts)
