"""What flows through an evaluation: a dataset's items, and one answer to one item at one rate point.

Every dataset reader (:mod:`.datasets`) yields :class:`Item`; every evaluation pipeline
(:mod:`.pipelines`) turns items into :class:`Outcome`; every metric (:mod:`.metrics`) scores
outcomes against the items' references. These are plain data, JSON-serialisable, so a run can
write them line by line and resume from what it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The tasks comneck-eval measures, each with the metric that scores it (see :mod:`.metrics`).
EVAL_TASKS: dict[str, str] = {
    "caption": "COCO Karpathy test: CIDEr, BLEU-4 (pycocoevalcap)",
    "mcq": "SEED-Bench image dimensions: multiple-choice accuracy, overall and per dimension",
    "rec": "RefCOCO / RefCOCO+ / RefCOCOg: Acc@0.5 IoU on boxes in the photo's pixels",
    "fewshot": "5-way 1-shot episodes: accuracy by the official rule and by class match",
    "classify": "zero-shot classification of an ImageFolder: top-1 accuracy",
    "human": "human viewing (Kodak-style folder): PSNR and MS-SSIM of the codec's reconstruction",
}


@dataclass(frozen=True)
class Support:
    """One labelled example of a few-shot episode."""

    image: Path
    label: str


@dataclass(frozen=True)
class Item:
    """One question a dataset asks about one photo.

    * ``id``: unique within the dataset split (the published id where there is one).
    * ``image``: the photo's file.
    * ``prompt``: the question, referring expression or instruction ("" where the backend's own
      prompt does: captions, few-shot).
    * ``choices``: a multiple-choice question's options, in order (letters A, B, ... by position).
    * ``reference``: what a correct answer is: captions (list of str), the answer letter (str), a
      box ``[x0, y0, x1, y1]`` in the photo's pixels (list of float), a class label (str), or None
      (human viewing compares with the photo itself).
    * ``group``: the sub-set the item counts in besides the whole (a SEED-Bench dimension, a RefCOCO split).
    * ``support``: a few-shot episode's labelled examples, in prompt order.
    * ``extra``: what else the published file says that a report may show (JSON values only).
    """

    id: str
    image: Path
    prompt: str = ""
    choices: tuple[str, ...] = ()
    reference: Any = None
    group: str | None = None
    support: tuple[Support, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Outcome:
    """One item's answer through one pipeline at one rate point, and what it cost.

    ``bytes`` are the real bytes the pipeline sent (a ComNeck container, a JPEG file, H x W x 3 for
    the uncompressed image as raw 8-bit RGB); ``bpp`` is 8 x bytes / the pixels of the image that was coded; ``edge_ms``
    the time the device spent coding it; ``details`` the backend's structured answer (box, letter,
    class, ...); ``reconstruction`` (optional) the decoded image, for the report's gallery.
    """

    item_id: str
    pipeline: str
    point: str
    text: str
    details: dict[str, Any]
    bytes: int
    bpp: float
    edge_ms: float
    random_weights: bool
    reconstruction: Any = None
