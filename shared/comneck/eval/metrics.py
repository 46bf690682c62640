"""Each task's score, computed as the task's official scorer computes it.

A :class:`Metric` scores one item's :class:`~.items.Outcome` against the item's reference
(:meth:`Metric.score`) and summarises one (pipeline, rate point) (:meth:`Metric.summarize`): the
primary metric first, then the secondaries, the primary per ``item.group``, and ``count``. Scores
are in the units the papers print: accuracies in percent (per item 100 or 0, so that a mean is
the accuracy), captioning metrics times 100, PSNR and MS-SSIM in dB.

* ``caption``: CIDEr (pycocoevalcap's, i.e. CIDEr-D), BLEU-1..4, and METEOR and SPICE where Java
  runs them (:class:`CaptionMetric`). CIDEr's IDF comes from the whole set, so per-item scores
  are the per-image scores of the corpus run (:meth:`Metric.evaluate`).
* ``mcq``: SEED-Bench accuracy by Honeybee's ``calc_seed_score``.
* ``rec``: Acc@0.5 by Shikra's ``RECComputeMetrics``.
* ``fewshot``: accuracy by the V2L evaluation's prefix rule, and by class match.
* ``classify``: top-1 (and top-5 where the answer ranks five labels or more).
* ``human``: PSNR and MS-SSIM as CompressAI's ``eval_model`` computes them.
"""

from __future__ import annotations

import math
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from compressai.utils.eval_model.__main__ import compute_metrics, psnr
from PIL import Image
from torchvision.ops import box_iou

from ..errors import ComneckInputError, ErrorCode
from ..image import ResizePolicy, load_image, resize_for_codec, to_tensor
from .items import EVAL_TASKS, Item, Outcome

#: The smallest image side pytorch_msssim's 5-scale MS-SSIM takes: (11 - 1) * 2**4 + 1.
MS_SSIM_MIN_SIDE = 161


@dataclass
class Scores:
    """One (pipeline, rate point): the summary and each item's own scores, by item id."""

    summary: dict[str, float]
    per_item: dict[str, dict[str, float]]


class Metric(ABC):
    """A task's scorer. ``name`` is the primary summary key; ``notes`` say what this run of the
    metric left out or did otherwise (a report prints them)."""

    name: str

    @property
    def notes(self) -> list[str]:
        """What a report must say about how this metric was computed here (none by default)."""
        return []

    @abstractmethod
    def score(self, item: Item, outcome: Outcome) -> dict[str, float]:
        """One item's scores ({} where the metric exists only over the whole set)."""

    def evaluate(self, items: Sequence[Item], outcomes: Sequence[Outcome]) -> Scores:
        """Score one (pipeline, rate point): each outcome against its item, then the summary."""
        pairs = pair_up(items, outcomes)
        per_item = {outcome.item_id: self.score(item, outcome) for item, outcome in pairs}
        return Scores(summarize_means(self.name, pairs, per_item), per_item)

    def summarize(self, items: Sequence[Item], outcomes: Sequence[Outcome]) -> dict[str, float]:
        """The summary of one (pipeline, rate point): primary metric first, secondaries, ``count``."""
        return self.evaluate(items, outcomes).summary


def pair_up(items: Sequence[Item], outcomes: Sequence[Outcome]) -> list[tuple[Item, Outcome]]:
    """Each outcome with its item; all outcomes must come from one (pipeline, rate point)."""
    by_id = {item.id: item for item in items}
    curves = {(o.pipeline, o.point) for o in outcomes}
    if len(curves) > 1:
        raise ComneckInputError(f"a summary covers one (pipeline, point); these outcomes come from {sorted(curves)}",
                                ErrorCode.INVALID_INPUT)
    missing = [o.item_id for o in outcomes if o.item_id not in by_id]
    if missing:
        raise ComneckInputError(f"outcomes for items the dataset does not hold: {missing[:5]}", ErrorCode.INVALID_INPUT)
    return [(by_id[o.item_id], o) for o in outcomes]


def summarize_means(primary: str, pairs: Sequence[tuple[Item, Outcome]],
                    per_item: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every per-item key's mean over the items that have it (primary first), the primary's mean
    per ``item.group`` as ``"<primary>/<group>"``, then ``count`` and ``count/<group>``."""
    keys = [primary] + [k for scores in per_item.values() for k in scores if k != primary]
    summary = {key: _mean([s[key] for s in per_item.values() if key in s]) for key in dict.fromkeys(keys)}
    groups = sorted({item.group for item, _ in pairs if item.group is not None})
    for group in groups:
        values = [per_item[o.item_id].get(primary) for item, o in pairs if item.group == group]
        summary[f"{primary}/{group}"] = _mean([v for v in values if v is not None])
    summary["count"] = float(len(pairs))
    for group in groups:
        summary[f"count/{group}"] = float(sum(item.group == group for item, _ in pairs))
    return summary


def _mean(values: Sequence[float]) -> float:
    """The mean, NaN for none (a summary keeps its keys even over an empty set)."""
    return sum(values) / len(values) if values else math.nan


def _text_reference(item: Item, expected: str) -> str:
    """The item's reference as a string (an answer letter, a class name)."""
    if not isinstance(item.reference, str) or not item.reference:
        raise ComneckInputError(f"{item.image}: item {item.id!r} needs {expected} as its reference, got {item.reference!r}",
                                ErrorCode.INVALID_INPUT)
    return item.reference


def _percent(correct: bool) -> float:
    """One item's accuracy in percent: 100 or 0."""
    return 100.0 if correct else 0.0


# -- caption -----------------------------------------------------------------------------------

#: The fallback tokeniser: lower case; words of letters and digits joined by inner hyphens or
#: apostrophes; brackets as PTB's tokens (-lrb-, -rrb-, ...: COCOEvalCap keeps them, as it drops
#: only upper-case bracket names after lower-casing); everything else dropped. It equals
#: PTBTokenizer (``-lowerCase``, COCOEvalCap's punctuation removed) on captions of words, brackets
#: and sentence punctuation; PTB splits contractions and possessives ("cat 's") and symbols ("%"),
#: and keeps decimals and abbreviations ("3.5", "u.s.") whole.
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*|[()\[\]{}]")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def fallback_tokens(caption: str) -> str:
    """A caption tokenised without Java (:data:`_WORD`), as a space-joined string like PTB's."""
    return " ".join(_BRACKETS.get(t, t) for t in _WORD.findall(caption.lower()))

def _spice_jar() -> Path:
    """Where pycocoevalcap's SPICE wants Stanford CoreNLP 3.6.0 (it downloads it on first use)."""
    from pycocoevalcap.spice import get_stanford_models as models

    return Path(models.SPICEDIR) / models.SPICELIB / f"{models.JAR}.jar"


class CaptionMetric(Metric):
    """COCO caption metrics through pycocoevalcap, as COCOEvalCap runs them.

    ``java``: whether Java runs PTBTokenizer, METEOR and SPICE (None: whenever ``java`` is on
    PATH). Without Java the captions go through the documented fallback tokeniser (:data:`_WORD`)
    and METEOR and SPICE are skipped. ``meteor_spice=False`` skips those two (each starts a JVM
    with GBs of heap; METEOR alone takes seconds). SPICE also needs Stanford CoreNLP's jars,
    which pycocoevalcap downloads on first use: where they are absent SPICE is skipped, never
    downloaded.
    """

    name = "CIDEr"

    def __init__(self, java: bool | None = None, meteor_spice: bool = True) -> None:
        self.java = shutil.which("java") is not None if java is None else java
        self.meteor = self.java and meteor_spice
        self.spice = self.meteor and _spice_jar().is_file()
        self.meteor_spice = meteor_spice

    @property
    def notes(self) -> list[str]:
        if not self.java:
            return ["no Java on PATH: captions tokenised by the fallback, not PTBTokenizer (lower case, words of "
                    "letters and digits, punctuation dropped: the same tokens on plain captions, but contractions, "
                    "possessives, decimals and symbols split differently); METEOR and SPICE skipped"]
        if not self.meteor_spice:
            return ["METEOR and SPICE switched off"]
        if not self.spice:
            return [f"SPICE skipped: Stanford CoreNLP 3.6.0 is not at {_spice_jar()} (pycocoevalcap downloads it "
                    "on first use; this run does not)"]
        return []

    def score(self, item: Item, outcome: Outcome) -> dict[str, float]:
        """{}: CIDEr's IDF is the whole set's (:meth:`evaluate` gives the per-image scores)."""
        return {}

    def evaluate(self, items: Sequence[Item], outcomes: Sequence[Outcome]) -> Scores:
        """One corpus run of every scorer; its per-image scores are the per-item scores."""
        pairs = sorted(pair_up(items, outcomes), key=lambda pair: pair[1].item_id)  # SPICE answers in sorted order
        ids = [outcome.item_id for _, outcome in pairs]
        gts = self._tokenize({o.item_id: self._references(item) for item, o in pairs})
        res = self._tokenize({o.item_id: [o.text] for _, o in pairs})
        per_item: dict[str, dict[str, float]] = {i: {} for i in ids}
        summary: dict[str, float] = {}
        for key, corpus, images in self._run(gts, res):
            summary[key] = 100.0 * float(corpus)
            for item_id, value in zip(ids, images):
                per_item[item_id][key] = 100.0 * float(value)
        order = ["CIDEr", "BLEU-4", "BLEU-1", "BLEU-2", "BLEU-3", "METEOR", "SPICE"]
        summary = {key: summary[key] for key in order if key in summary} or {"CIDEr": math.nan}
        summary["count"] = float(len(pairs))
        return Scores(summary, per_item)

    def _run(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> list[tuple[str, float, list[float]]]:
        """(key, corpus score, per-image scores in ``gts`` order) of each scorer this run has."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider

        if not gts:
            return []
        bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
        cider, cider_images = Cider().compute_score(gts, res)
        runs = [("CIDEr", cider, list(cider_images))]
        runs += [(f"BLEU-{n + 1}", bleu[n], bleu_images[n]) for n in range(4)]
        if self.meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            runs.append(("METEOR", *Meteor().compute_score(gts, res)))
        if self.spice:
            from pycocoevalcap.spice.spice import Spice

            spice, spice_images = Spice().compute_score(gts, res)
            runs.append(("SPICE", spice, [image["All"]["f"] for image in spice_images]))
        return runs

    def _tokenize(self, captions: dict[str, list[str]]) -> dict[str, list[str]]:
        """PTBTokenizer as COCOEvalCap calls it, or the fallback where Java is missing."""
        if self.java:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            tokenized = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()}) if captions else {}
            return {k: tokenized[k] for k in captions}
        return {k: [fallback_tokens(c) for c in v] for k, v in captions.items()}

    @staticmethod
    def _references(item: Item) -> list[str]:
        """The item's reference captions: a non-empty list of strings."""
        refs = item.reference
        if not isinstance(refs, (list, tuple)) or not refs or not all(isinstance(r, str) for r in refs):
            raise ComneckInputError(f"{item.image}: caption item {item.id!r} needs a list of reference captions, got {refs!r}",
                                    ErrorCode.INVALID_INPUT)
        return list(refs)


# -- mcq ---------------------------------------------------------------------------------------


class ChoiceAccuracy(Metric):
    """SEED-Bench accuracy as Honeybee's ``calc_seed_score`` counts it (``tasks/seed/seed_task.py``):
    correct iff the generated text, stripped and lower-cased, equals the answer letter stripped
    and lower-cased. An answer "A." or "A. a dog" is wrong, as there."""

    name = "accuracy"

    def score(self, item: Item, outcome: Outcome) -> dict[str, float]:
        answer = _text_reference(item, "the answer letter")
        return {"accuracy": _percent(outcome.text.strip().lower() == answer.strip().lower())}


# -- rec ---------------------------------------------------------------------------------------


class BoxAccuracy(Metric):
    """Acc@0.5 as Shikra's ``RECComputeMetrics`` counts it (``mllm/dataset/single_image_dataset/rec.py``):
    torchvision's ``box_iou`` on continuous [x0, y0, x1, y1] (area (x1 - x0)(y1 - y0), no +1),
    correct iff IoU > 0.5 (strictly); an answer without exactly one box counts as the box
    [0, 0, 0, 0] (IoU 0). The official IoU is on boxes normalised to the padded square, this one
    on the photo's pixels (``details["box_pixels"]``): the same ratio, as the square is the photo
    scaled and shifted. ``answered`` is the share of answers that held a box."""

    name = "Acc@0.5"

    def score(self, item: Item, outcome: Outcome) -> dict[str, float]:
        target = self._target(item)
        box = outcome.details.get("box_pixels")
        iou = float(box_iou(torch.tensor([box], dtype=torch.float64), target)[0, 0]) if box is not None else 0.0
        return {"Acc@0.5": _percent(iou > 0.5), "IoU": iou, "answered": _percent(box is not None)}

    @staticmethod
    def _target(item: Item) -> torch.Tensor:
        """The reference box as a [1, 4] tensor; it must have a positive area."""
        box = item.reference
        ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not ok or not (box[2] > box[0] and box[3] > box[1]):
            raise ComneckInputError(f"{item.image}: REC item {item.id!r} needs a box [x0, y0, x1, y1] with x1 > x0 and "
                                    f"y1 > y0 in the photo's pixels, got {box!r}", ErrorCode.INVALID_INPUT)
        return torch.tensor([box], dtype=torch.float64)


# -- fewshot -----------------------------------------------------------------------------------


class FewShotAccuracy(Metric):
    """Few-shot accuracy by the V2L evaluation's rule (``codec_V2L_fewshot.py``, main loop):
    correct iff ``generated[:len(class_name)] == class_name`` (a case-sensitive prefix match of
    the decoded text, ``details["generated"]``; the answer text where a backend reports none).
    ``class accuracy``: the top class by sequence log-probability (``details["labels"][0]``)
    is the reference (items whose answer ranks no labels have none)."""

    name = "accuracy"

    def score(self, item: Item, outcome: Outcome) -> dict[str, float]:
        target = _text_reference(item, "the query's class name")
        generated = outcome.details.get("generated", outcome.text)
        scores = {"accuracy": _percent(generated[: len(target)] == target)}
        labels = outcome.details.get("labels")
        if labels:
            scores["class accuracy"] = _percent(labels[0]["label"] == target)
        return scores


# -- classify ----------------------------------------------------------------------------------


class TopKAccuracy(Metric):
    """Zero-shot classification: top-1 (the answer text is the reference label) and top-5 (the
    reference is among ``details["labels"][:5]``, only where the answer ranks 5 labels or more)."""

    name = "top-1"

    def score(self, item: Item, outcome: Outcome) -> dict[str, float]:
        target = _text_reference(item, "a class label")
        scores = {"top-1": _percent(outcome.text == target)}
        labels = outcome.details.get("labels") or []
        if len(labels) >= 5:
            scores["top-5"] = _percent(target in [entry["label"] for entry in labels[:5]])
        return scores


# -- human -------------------------------------------------------------------------------------

Frame = Callable[[Path], torch.Tensor]


def photo_frame(path: Path) -> torch.Tensor:
    """The photo itself, [1, 3, H, W] in [0, 1] (the codec's view under the ``none`` policy)."""
    return to_tensor(load_image(path))


def codec_frame(policy: ResizePolicy, size: int) -> Frame:
    """The codec's view of a photo under a resize policy: what its reconstruction is compared with."""
    return lambda path: to_tensor(resize_for_codec(load_image(path), policy, size))


class HumanViewing(Metric):
    """PSNR and MS-SSIM as CompressAI's ``utils/eval_model`` computes them (``compute_metrics``, called
    here): both images times 255, clamped and rounded to 8 bits; PSNR = 20 log10 255 - 10 log10 MSE
    (inf for identical images); MS-SSIM by pytorch_msssim with ``data_range=255``. ``MS-SSIM (dB)``
    = -10 log10(1 - MS-SSIM), per item and, as CompressAI's plot does, of the mean MS-SSIM. Images
    with a side under 161 px get PSNR only (5-scale MS-SSIM needs more).

    ``frame`` gives, from the item's photo, the image the codec saw (:func:`photo_frame`, or
    :func:`codec_frame` for a resize policy); ``outcome.reconstruction`` is the decoded image,
    [1, 3, H, W] in [0, 1] or a PIL image, of the same size.
    """

    name = "PSNR"

    def __init__(self, frame: Frame = photo_frame) -> None:
        self.frame = frame

    def score(self, item: Item, outcome: Outcome) -> dict[str, float]:
        if outcome.reconstruction is None:
            raise ComneckInputError(f"{item.image}: pipeline {outcome.pipeline!r} gave no reconstruction; human viewing "
                                    "scores the decoded image", ErrorCode.INVALID_INPUT)
        original = self.frame(item.image)
        decoded = outcome.reconstruction
        decoded = to_tensor(decoded) if isinstance(decoded, Image.Image) else decoded.detach().float().cpu()
        if decoded.shape != original.shape:
            raise ComneckInputError(f"{item.image}: the reconstruction is {list(decoded.shape)}, the codec's view of the "
                                    f"photo {list(original.shape)}", ErrorCode.INVALID_INPUT)
        if min(original.shape[-2:]) < MS_SSIM_MIN_SIDE:
            return {"PSNR": float(psnr(*(_eight_bit(x) for x in (original, decoded))))}
        metrics = compute_metrics(original, decoded, 255)
        return {"PSNR": metrics["psnr-rgb"], "MS-SSIM": metrics["ms-ssim-rgb"], "MS-SSIM (dB)": _db(metrics["ms-ssim-rgb"])}

    def evaluate(self, items: Sequence[Item], outcomes: Sequence[Outcome]) -> Scores:
        """Means, with ``MS-SSIM (dB)`` taken of the mean MS-SSIM (CompressAI's plot)."""
        scores = super().evaluate(items, outcomes)
        if "MS-SSIM" in scores.summary:
            scores.summary["MS-SSIM (dB)"] = _db(scores.summary["MS-SSIM"])
        return scores


def _eight_bit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> 0..255 rounded, as CompressAI's ``compute_metrics`` prepares both images."""
    return (x * 255).clamp(0, 255).round()


def _db(ms_ssim: float) -> float:
    """MS-SSIM in dB: -10 log10(1 - MS-SSIM) (inf at 1)."""
    return math.inf if ms_ssim >= 1 else -10 * math.log10(1 - ms_ssim)


# -- the tasks ---------------------------------------------------------------------------------

METRICS: dict[str, Callable[[], Metric]] = {
    "caption": CaptionMetric,
    "mcq": ChoiceAccuracy,
    "rec": BoxAccuracy,
    "fewshot": FewShotAccuracy,
    "classify": TopKAccuracy,
    "human": HumanViewing,
}


def metric_for(task: str) -> Metric:
    """The task's metric with its defaults (human viewing compares with the photo itself: build
    ``HumanViewing(codec_frame(policy, size))`` for a resizing codec view)."""
    if task not in METRICS:
        raise ComneckInputError(f"unknown eval task {task!r}; choose one of {', '.join(EVAL_TASKS)}", ErrorCode.UNKNOWN_TASK)
    return METRICS[task]()

