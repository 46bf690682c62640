"""The trained path as one module, so DistributedDataParallel can wrap it.

codec view x -> ELIC (g_a, quantisation, entropy model) -> y_hat -> neck -> CLIP tail (d1-d3),
or -> g_s -> U-Net -> full CLIP (postproc). The teacher is the same frozen CLIP on the
uncompressed image's CLIP view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..clip_split import ClipFeatures, ClipSplit, ClipTap, clip_input
from ..codec import LearnedCodec
from ..pipeline import latent_features


@dataclass(frozen=True)
class Target:
    """What distillation compares: the projected CLS embedding, or all tokens at one block."""

    kind: str  # "cls" or "tokens"
    block: int | None = None  # 1-based, for "tokens"

    @classmethod
    def of(cls, kind: str, block: int, num_blocks: int) -> "Target":
        if kind == "cls":
            return cls("cls")
        return cls("tokens", ClipTap("hidden", block=block).block_index(num_blocks))

    def hidden_blocks(self) -> list[int]:
        return [self.block] if self.block is not None else []

    def select(self, features: ClipFeatures) -> torch.Tensor:
        return features.embedding if self.kind == "cls" else features.hidden[self.block]  # type: ignore[index]


class Student(nn.Module):
    """Codec + neck (+ U-Net) + CLIP split; ``forward`` returns what the losses need."""

    def __init__(self, codec: LearnedCodec, neck: nn.Module, clip: ClipSplit, target: Target, unet: nn.Module | None = None) -> None:
        super().__init__()
        self.codec, self.neck, self.clip, self.unet = codec, neck, clip, unet
        self.target = target

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """y_hat and the likelihoods of y and z, as CompressAI's training forward computes them
        (noise for z while the codec trains, straight-through rounding around the means for y)."""
        model = self.codec.model
        out = model.latent_codec(model.g_a(x))
        return out["y_hat"], out["likelihoods"]

    def forward(self, x: torch.Tensor, with_x_hat: bool = False, autocast: torch.autocast | None = None) -> dict[str, torch.Tensor]:
        """``with_x_hat`` also runs g_s (d2's MSE term)."""
        y_hat, likelihoods = self.latents(x)
        out: dict[str, torch.Tensor] = {"likelihoods": likelihoods}  # type: ignore[dict-item]
        with autocast or torch.autocast(x.device.type, enabled=False):
            if self.unet is not None:  # post-processing baseline: reconstruct, enhance, full CLIP
                x_hat = self.codec.model.g_s(y_hat)
                enhanced = self.unet(x_hat)
                features = self.clip.tail(self.clip.head(clip_input(enhanced, self.clip.visual.image_size[0])), self.target.hidden_blocks())
            else:
                if with_x_hat:
                    out["x_hat"] = self.codec.model.g_s(y_hat)
                features = latent_features(self.neck, self.clip, y_hat, self.target.hidden_blocks())
        out["student"] = self.target.select(features)
        out["embedding"] = features.embedding
        return out
