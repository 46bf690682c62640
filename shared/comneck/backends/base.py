"""What every downstream model (MLLM backend) is, and what it is told when it loads.

A backend is described by a :class:`BackendSpec` (registered in :mod:`.registry`): the CLIP
it needs and the tap it reads (:class:`~comneck.clip_split.ClipTap`), its tasks, the weight
files it reads and the packages it needs. Loaded, it is a :class:`Backend`: it checks a
prompt cheaply (before any decoding) and answers a batch, given the features its tap
selects from one neck + CLIP-tail pass over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..bitstream import Source
from ..clip_split import ClipTap
from ..errors import ComneckInputError, ErrorCode
from ..presets import ClipConfig

#: Task names a request may ask for; each backend serves some of them.
TASKS: dict[str, str] = {
    "caption": "describe the image in a sentence",
    "vqa": "answer a question about the image",
    "rec": "locate the object a phrase refers to (box)",
    "classify": "pick the label that fits the image best",
    "fewshot": "name the image's class from labelled support examples (in-context)",
}

#: A multiple-choice request offers 2 to 26 choices, answered by letter (A to Z).
MAX_CHOICES = 26


def check_choices(choices: Sequence[str]) -> list[str]:
    """A request's choices, refused (``bad_choices``) unless they are 2 to 26 non-empty strings."""
    if not 2 <= len(choices) <= MAX_CHOICES:
        raise ComneckInputError(f"a multiple-choice request offers 2 to {MAX_CHOICES} choices; got {len(choices)}",
                                ErrorCode.BAD_CHOICES)
    empty = [i for i, choice in enumerate(choices) if not choice.strip()]
    if empty:
        raise ComneckInputError(f"choice {empty[0] + 1} is empty", ErrorCode.BAD_CHOICES)
    return list(choices)


#: Support examples one few-shot request or support set may hold (a msgpack array's limit).
MAX_SUPPORT = 64


def check_support_labels(labels: Sequence[str], bitstreams: int | None = None) -> list[str]:
    """Support labels, refused (``bad_support``) unless they are 1 to 64 non-empty strings of at
    least 2 distinct classes, one per support bitstream when ``bitstreams`` counts those."""
    if bitstreams is not None and bitstreams != len(labels):
        raise ComneckInputError(f"give one label per support bitstream (got {bitstreams} bitstreams, {len(labels)} labels)",
                                ErrorCode.BAD_SUPPORT)
    if not labels or len(labels) > MAX_SUPPORT:
        raise ComneckInputError(f"a few-shot episode takes 1 to {MAX_SUPPORT} support examples; got {len(labels)}", ErrorCode.BAD_SUPPORT)
    if any(not label.strip() for label in labels):
        raise ComneckInputError("a support label is empty", ErrorCode.BAD_SUPPORT)
    if len(set(labels)) < 2:
        raise ComneckInputError(f"a few-shot episode needs at least 2 classes; the support has {len(set(labels))}", ErrorCode.BAD_SUPPORT)
    return list(labels)


@dataclass(frozen=True)
class ClipRequirement:
    """The CLIP a backend's published weights were trained on: open_clip architecture name and
    input side (the LLaVA-style 336 px models need a codec input of 384: preset ``paper-336``)."""

    arch: str
    image_size: int
    width: int | None = None  # checked too when the weights name it (LLaVA's vision_config)

    def fits(self, clip: ClipConfig) -> bool:
        """The gateway's CLIP is this one (a tiny stand-in counts as what it stands for)."""
        return (clip.arch, clip.image_size) == (self.arch, self.image_size) and self.width in (None, clip.width)

    def describe(self) -> str:
        return f"{self.arch} at {self.image_size} px" + (f", width {self.width}" if self.width is not None else "")


@dataclass(frozen=True)
class BackendSpec:
    """One registry entry: everything known about a backend before its code is imported.

    * ``target``: ``"module:Class"``, imported only when the backend loads; the class has a
      ``load(context: BackendContext)`` classmethod.
    * ``clip``: the CLIP its published weights need; None when it reads whichever CLIP the
      gateway loaded (the zero-shot labeller uses that CLIP's own text tower).
    * ``clip_of_weights``: ``"module:function"`` for backends whose checkpoints come for several
      CLIPs (LLaVA at 224 or 336 px): the function reads the weights' own config, cheaply (no
      model, no transformers), and returns the :class:`ClipRequirement` that replaces ``clip``.
    * ``weight_files``: the files of its published checkpoint it reads, in their authors' names.
    * ``extra`` / ``packages``: the pip extra that installs what it needs, and the import
      names checked at load time.
    * ``random_init``: without weights it builds a seeded random model and says so.
    * ``example_prompt``: a prompt it answers (shown by /v1/models, used by the contract test).
    * ``options``: names of the path options ``--backend NAME=WEIGHTS,KEY=PATH`` may add
      (Shikra's delta takes ``base``).
    * ``resize``: the edge's resize policy that frames photos as its published weights saw them
      (``pad-square-white`` for Shikra); answers to bitstreams framed otherwise say so.
    * ``choices``: it answers multiple-choice requests (a request's ``choices``); others refuse them.
    * ``engines``: the LLM engines it decodes on (``--backend NAME=WEIGHTS,engine=E``), the
      default first; none for a backend without an LLM. ``no_vllm`` says why ``vllm`` is not
      among them, for a backend with an LLM that cannot decode there.
    """

    name: str
    target: str
    description: str
    tasks: tuple[str, ...]  # the first is the default task
    tap: ClipTap
    clip: ClipRequirement | None = None
    clip_of_weights: str | None = None
    weight_files: tuple[str, ...] = ()
    extra: str | None = None
    packages: tuple[str, ...] = ()
    random_init: bool = True
    example_prompt: str = ""
    options: tuple[str, ...] = ()
    resize: str | None = None
    choices: bool = False
    engines: tuple[str, ...] = ()
    no_vllm: str = ""


@dataclass(frozen=True)
class BackendContext:
    """What a backend gets when it loads: its weights (None: random), path options and the gateway's CLIP."""

    spec: BackendSpec
    weights: Path | None
    clip_model: nn.Module  # the whole open_clip CLIP (text tower included)
    clip_config: ClipConfig
    clip_random: bool  # the CLIP holds random weights
    device: torch.device
    dtype: torch.dtype
    options: dict[str, str] = field(default_factory=dict)


class GenerationOptions(BaseModel):
    """Decoding options of one item (a request's, or one item's of a batch); each backend uses
    those that apply to it."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=1024, description="longest answer, in tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 decodes greedily")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(5, ge=1, le=100, description="how many ranked alternatives to return (classifiers)")
    logprobs: int = Field(0, ge=0, le=20, description="top log-probabilities to return per generated token (0: none)")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="seed for sampling (temperature > 0); same seed, same tokens"
    )
    template: int | None = Field(
        None, ge=0, description="which of the backend's own prompt templates wraps the prompt (shikra; default 0)"
    )


@dataclass(frozen=True)
class ImageInfo:
    """What one item's container says of its image: the codec input's size (H, W) and, when the
    edge recorded it, the photo it was made from (size and resize policy)."""

    size: tuple[int, int]
    source: Source | None = None


@dataclass
class BackendAnswer:
    """A backend's reply: the text, and structured details (scores, boxes, ...).

    LLM backends put ``prompt_token_ids``, ``token_ids`` (what was generated),
    ``finish_reason`` and, with the item's ``options.logprobs = k > 0``, ``logprobs`` (one entry per
    generated token, as :class:`~comneck.backends.engines.Generation` has them) in ``details``.
    """

    text: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SupportExample:
    """One labelled support example as a few-shot backend shows it in its prompt: ``description``
    is what :meth:`FewShotBackend.describe` made of its image (V2L: the image's words)."""

    description: str
    label: str


class Backend(Protocol):
    """What the pipeline needs from a loaded downstream model."""

    spec: BackendSpec
    random_weights: bool

    def check_prompt(self, prompt: str, task: str, options: GenerationOptions, choices: Sequence[str] = ()) -> None:
        """Refuse one item's prompt this backend cannot use with that item's ``options``
        (``bad_prompt``, ``unknown_template``, ``prompt_too_long``), cheaply: it runs before
        decoding. ``choices`` (checked by :func:`check_choices`) come only to a backend whose spec takes them."""
        ...

    def generate(self, features: torch.Tensor, prompts: list[str], task: str, options: Sequence[GenerationOptions],
                 images: Sequence[ImageInfo] = (), choices: Sequence[Sequence[str]] = ()) -> list[BackendAnswer]:
        """Features selected by ``spec.tap`` for a batch ([B, ...]) -> one answer per prompt;
        ``options`` (one per item) decode each item as it would be decoded alone (its template,
        length, sampling, seed, logprobs, top-k); ``images`` (one per item, or empty) lets a
        backend map boxes back to each photo; ``choices`` (one list per item, empty for a
        free-form item; or empty) are multiple-choice options."""
        ...


class FewShotBackend(Backend, Protocol):
    """A backend of task ``fewshot``: the pipeline describes each support image once
    (:meth:`describe`; a registered support set keeps the descriptions), then asks
    :meth:`fewshot` for each query."""

    def check_support(self, labels: Sequence[str]) -> None:
        """Refuse labels it cannot decode (``bad_support``), cheaply: it runs before decoding."""
        ...

    def describe(self, features: torch.Tensor) -> list[str]:
        """Features selected by ``spec.tap`` for support images [N, ...] -> one description each."""
        ...

    def fewshot(self, features: torch.Tensor, support: Sequence[SupportExample],
                options: Sequence[GenerationOptions]) -> list[BackendAnswer]:
        """Query features [B, ...] -> one answer per query, each in the episode ``support`` makes
        and with its own ``options`` (one per query)."""
        ...
