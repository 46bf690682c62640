"""CLIP's vision tower cut in two at block k: the head (pixels -> input of block k+1) and
the tail C' (block k+1 .. last -> features), so the neck's tokens can enter in the middle.

The split reuses open_clip's own modules and steps (``_embeds``, ``resblocks``,
``_pool``, ``proj``), so head-then-tail equals ``CLIP.encode_image`` exactly.
Blocks are numbered from 1 as in the paper ("the third transformer block").

``final_norm="twice"`` reproduces the paper's official CLIP (``CLIP_modify``), whose
``VisionTransformer.forward`` applies ``ln_post`` two times before ``proj``: every feature after
``ln_post`` (``post_ln``, ``projected``, ``embedding``) then sees the norm twice; the hidden
block outputs do not change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import VisionTransformer
from torch import nn

from .errors import ComneckInputError, ErrorCode
from .presets import ClipConfig, check_final_norm


def clip_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """A codec-view image in [0, 1] (the photo framed for the codec) -> CLIP's input: the same field
    of view, resized to ``size`` (bicubic, antialiased) and normalised with CLIP's statistics. The
    full-CLIP paths (the uncompressed image, reconstructions, the U-Net's output) all enter so."""
    x = nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def build_clip(config: ClipConfig) -> open_clip.CLIP:
    """An open_clip CLIP with random weights built from the preset's config."""
    return open_clip.CLIP(**config.model_cfg, quick_gelu=config.quick_gelu)


@dataclass
class ClipFeatures:
    """What the tail computes; each backend reads the tap it declares.

    * ``hidden[j]``: output of block j (1-based), all tokens, before ``ln_post``
      (e.g. Shikra reads block 23, Honeybee block 24 with the class token dropped).
    * ``post_ln``: last block after ``ln_post``, all tokens.
    * ``projected``: ``post_ln @ proj`` for all tokens (LLaMA-Adapter).
    * ``embedding``: the pooled image embedding, exactly ``CLIP.encode_image`` (V2L, distillation).
    """

    embedding: torch.Tensor
    post_ln: torch.Tensor
    projected: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


TapSource = Literal["hidden", "post_ln", "projected", "embedding"]
TapTokens = Literal["all", "patches", "cls"]


@dataclass(frozen=True)
class ClipTap:
    """Which CLIP features a backend reads.

    * ``source``: ``hidden`` (a block's output, before ``ln_post``), ``post_ln`` (last block
      after ``ln_post``), ``projected`` (``post_ln @ proj``) or ``embedding`` (the pooled,
      projected image embedding, ``CLIP.encode_image``).
    * ``block``: for ``hidden``, the 1-based block; negative counts from the end as in
      LLaVA's ``select_layer`` (-1 the last block, -2 the one before: Shikra's block 23).
    * ``tokens``: ``all`` (class token first), ``patches`` (class token dropped) or ``cls``.
    """

    source: TapSource
    block: int | None = None
    tokens: TapTokens = "all"

    def __post_init__(self) -> None:
        if (self.source == "hidden") != (self.block is not None):
            raise ValueError("a block index goes with source='hidden' and only with it")
        if self.source == "embedding" and self.tokens != "cls":
            raise ValueError("the pooled embedding is one vector per image: use tokens='cls'")

    def block_index(self, num_blocks: int) -> int | None:
        """The 1-based block this tap reads in a ViT of ``num_blocks`` blocks (None: not a hidden tap)."""
        if self.block is None:
            return None
        index = self.block + num_blocks + 1 if self.block < 0 else self.block
        if not 1 <= index <= num_blocks:
            raise ComneckInputError(f"tap block {self.block} does not exist in a {num_blocks}-block CLIP", ErrorCode.BAD_TAP)
        return index

    def select(self, features: ClipFeatures, num_blocks: int) -> torch.Tensor:
        """The tensor this tap names: [B, D] for ``cls``, else [B, T, D]."""
        if self.source == "embedding":
            return features.embedding
        if self.source == "hidden":
            x = features.hidden[self.block_index(num_blocks)]  # type: ignore[index]
        else:
            x = features.post_ln if self.source == "post_ln" else features.projected
        return {"all": x, "patches": x[:, 1:], "cls": x[:, 0]}[self.tokens]

    def describe(self) -> str:
        where = f"block {self.block} output" if self.source == "hidden" else self.source
        return f"{where}, {self.tokens} tokens" if self.source != "embedding" else "pooled image embedding"


class ClipSplit(nn.Module):
    """open_clip ViT cut after ``split_block`` blocks (0..layers-1); ``final_norm``: ``once``
    (standard CLIP) or ``twice`` (the official code's double ``ln_post``)."""

    def __init__(self, visual: VisionTransformer, split_block: int = 2, final_norm: str = "once") -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"ClipSplit needs an open_clip VisionTransformer, got {type(visual).__name__}")
        layers = len(visual.transformer.resblocks)
        if not 0 <= split_block < layers:
            raise ComneckInputError(f"split block must be in 0..{layers - 1} for a {layers}-block ViT, got {split_block}")
        self.visual = visual
        self.split_block = split_block
        self.final_norm = check_final_norm(final_norm)

    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    def head(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> tokens entering block ``split_block + 1`` (what the neck replaces)."""
        x = self.visual._embeds(images)
        for block in self.visual.transformer.resblocks[: self.split_block]:
            x = block(x)
        return x

    def tail(self, tokens: torch.Tensor, hidden_blocks: Iterable[int] = ()) -> ClipFeatures:
        """Tokens entering block ``split_block + 1`` -> :class:`ClipFeatures`.

        ``hidden_blocks`` lists the 1-based blocks whose outputs to keep; each must lie
        in the tail (``split_block + 1 .. num_blocks``).
        """
        wanted = set(hidden_blocks)
        bad = sorted(j for j in wanted if not self.split_block < j <= self.num_blocks)
        if bad:
            raise ComneckInputError(
                f"blocks {bad} are not in the CLIP tail (blocks {self.split_block + 1}..{self.num_blocks})"
            )
        hidden: dict[int, torch.Tensor] = {}
        x = tokens
        for j, block in enumerate(self.visual.transformer.resblocks[self.split_block :], start=self.split_block + 1):
            x = block(x)
            if j in wanted:
                hidden[j] = x
        visual = self.visual
        if self.final_norm == "twice":  # one extra ln_post; open_clip's pooling and post_ln below add the second
            x = visual.ln_post(x)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        post_ln = visual.ln_post(x)
        projected = post_ln @ visual.proj if visual.proj is not None else post_ln
        return ClipFeatures(embedding=pooled, post_ln=post_ln, projected=projected, hidden=hidden)

    def forward(self, images: torch.Tensor) -> ClipFeatures:
        """Full CLIP from pixels (head then tail): the uncompressed reference path."""
        return self.tail(self.head(images))
