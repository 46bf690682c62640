"""The one small protocol every downstream model (MLLM backend) implements.

A backend declares the CLIP tap it reads (:class:`ClipTap`), the tasks it serves, and
turns the selected features plus the user's prompt into text. The gateway runs the neck
and CLIP tail once per request and hands the backend only what its tap selects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..clip_split import ClipFeatures
from ..errors import ComneckInputError

#: Task names a request may ask for; each backend serves some of them.
TASKS: dict[str, str] = {
    "caption": "describe the image in a sentence",
    "vqa": "answer a question about the image",
    "rec": "locate the object a phrase refers to (box)",
    "classify": "pick the label that fits the image best",
}

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
            raise ComneckInputError(f"tap block {self.block} does not exist in a {num_blocks}-block CLIP", "bad_tap")
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


class GenerationOptions(BaseModel):
    """Decoding options a request may set; each backend uses those that apply to it."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=1024, description="longest answer, in tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 decodes greedily")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(5, ge=1, le=100, description="how many ranked alternatives to return (classifiers)")
    logprobs: int = Field(0, ge=0, le=20, description="top log-probabilities to return per generated token (0: none)")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="seed for sampling (temperature > 0); same seed, same tokens"
    )


@dataclass
class BackendAnswer:
    """A backend's reply: the text, and structured details (scores, boxes, ...)."""

    text: str
    details: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """What the gateway needs from a downstream model."""

    name: str
    description: str
    tasks: tuple[str, ...]  # the first is the default task
    tap: ClipTap
    random_weights: bool

    def answer(self, features: torch.Tensor, prompt: str, task: str, options: GenerationOptions) -> BackendAnswer:
        """Features selected by ``tap`` for one image -> the answer to ``prompt``."""
        ...
