"""comneck.eval.metrics against references written out here: BLEU (Papineni et al.) and CIDEr-D
(Vedantam et al.) from their equations, the official scorers' rules (Honeybee's SEED, Shikra's
REC, V2L's few-shot prefix match) applied by hand, and PSNR / MS-SSIM of constant images."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from comneck.errors import ComneckInputError, ErrorCode
from comneck.eval.items import EVAL_TASKS, Item, Outcome
from comneck.eval.metrics import BoxAccuracy, CaptionMetric, HumanViewing, codec_frame, fallback_tokens, metric_for
from comneck.image import frame_to_photo, sample_photo

HAS_JAVA = shutil.which("java") is not None
JAVA = [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_JAVA, reason="no java on PATH"))]


def outcome(item_id: str, text: str = "", details: dict | None = None, reconstruction=None,
            pipeline: str = "jpeg", point: str = "q50") -> Outcome:
    return Outcome(item_id, pipeline, point, text, details or {}, bytes=100, bpp=0.5, edge_ms=1.0,
                   random_weights=False, reconstruction=reconstruction)


# -- caption: the references ------------------------------------------------------------------

#: (id, reference captions, generated caption); the equations below read the captions as
#: PTBTokenizer leaves them: lower case, punctuation gone.
CAPTIONS = [
    ("c1", ["A cat sat on the mat.", "A cat is sitting on a mat."], "A cat sat on the red mat."),
    ("c2", ["A dog runs on the grass.", "The brown dog is running!"], "a dog runs on grass"),
    ("c3", ["Two people ride bikes down a street.", "People riding bicycles on a street."], "Two people ride bikes"),
]


def words(caption: str) -> list[str]:
    return caption.lower().replace(".", "").replace("!", "").split()


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_reference(pairs: list[tuple[list[str], list[list[str]]]], n_max: int) -> float:
    """Corpus BLEU-n_max: clipped n-gram precisions summed over the corpus, geometric mean, brevity
    penalty on the summed lengths (each sentence's closest reference length, the shorter on ties)."""
    matched, guessed = [0] * n_max, [0] * n_max
    hyp_len = ref_len = 0
    for hyp, refs in pairs:
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, n_max + 1):
            most = Counter()
            for r in refs:
                most |= ngrams(r, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in ngrams(hyp, n).items())
            guessed[n - 1] += max(len(hyp) - n + 1, 0)
    precision = math.prod(m / g for m, g in zip(matched, guessed)) ** (1 / n_max)
    return precision * (math.exp(1 - ref_len / hyp_len) if hyp_len < ref_len else 1.0)


def cider_d_reference(pairs: list[tuple[list[str], list[list[str]]]]) -> list[float]:
    """CIDEr-D per image (Vedantam et al. 2015, as COCO's CIDEr): tf-idf n-gram vectors, idf
    log(N / df) with df the number of images whose references hold the n-gram, the candidate's
    weights clipped at the reference's, a Gaussian length penalty (sigma 6), averaged over
    n = 1..4 and the references, times 10."""
    n_images = len(pairs)
    df = Counter(g for _, refs in pairs for g in {g for r in refs for n in range(1, 5) for g in ngrams(r, n)})

    def vector(tokens: list[str], n: int) -> dict:
        return {g: c * math.log(n_images / df[g]) if df[g] else c * math.log(n_images) for g, c in ngrams(tokens, n).items()}

    def norm(v: dict) -> float:
        return math.sqrt(sum(x * x for x in v.values()))

    scores = []
    for hyp, refs in pairs:
        total = 0.0
        for ref in refs:
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * 6.0 ** 2))
            for n in range(1, 5):
                g, h = vector(hyp, n), vector(ref, n)
                dot = sum(min(w, h.get(k, 0.0)) * h.get(k, 0.0) for k, w in g.items())
                total += penalty * (dot / (norm(g) * norm(h)) if norm(g) and norm(h) else 0.0) / 4
        scores.append(10 * total / len(refs))
    return scores


def caption_set() -> tuple[list[Item], list[Outcome], list[tuple[list[str], list[list[str]]]]]:
    items = [Item(i, Path(f"{i}.jpg"), reference=refs) for i, refs, _ in CAPTIONS]
    outcomes = [outcome(i, hyp) for i, _, hyp in CAPTIONS]
    return items, outcomes, [(words(hyp), [words(r) for r in refs]) for _, refs, hyp in CAPTIONS]


@pytest.mark.parametrize("java", JAVA)
def test_bleu_and_cider_equal_their_equations_per_corpus_and_per_image(java):
    items, outcomes, tokens = caption_set()
    scores = CaptionMetric(java=java, meteor_spice=False).evaluate(items, outcomes)
    assert list(scores.summary)[:5] == ["CIDEr", "BLEU-4", "BLEU-1", "BLEU-2", "BLEU-3"]
    for n in range(1, 5):
        assert scores.summary[f"BLEU-{n}"] == pytest.approx(100 * bleu_reference(tokens, n), rel=1e-6)
        for (item_id, _, _), pair in zip(CAPTIONS, tokens):
            assert scores.per_item[item_id][f"BLEU-{n}"] == pytest.approx(100 * bleu_reference([pair], n), rel=1e-6)
    cider = cider_d_reference(tokens)
    assert [scores.per_item[i]["CIDEr"] for i, _, _ in CAPTIONS] == pytest.approx([100 * c for c in cider], rel=1e-9)
    assert scores.summary["CIDEr"] == pytest.approx(100 * sum(cider) / 3, rel=1e-9)
    assert scores.summary["count"] == 3


def test_bleu_on_two_sentences_by_hand():
    """"a cat sat on the mat" against "a cat sat on the red mat", and "a dog runs" against itself:
    1-grams 9/9, 2-grams (4 + 2)/(5 + 2), 3-grams (3 + 1)/(4 + 1), 4-grams (2 + 0)/(3 + 0);
    length 9 against 10."""
    items = [Item("a", Path("a.jpg"), reference=["a cat sat on the red mat"]), Item("b", Path("b.jpg"), reference=["a dog runs"])]
    outcomes = [outcome("a", "a cat sat on the mat"), outcome("b", "a dog runs")]
    summary = CaptionMetric(java=False).summarize(items, outcomes)
    brevity = math.exp(1 - 10 / 9)
    assert summary["BLEU-1"] == pytest.approx(100 * brevity, rel=1e-6)
    assert summary["BLEU-2"] == pytest.approx(100 * brevity * (6 / 7) ** (1 / 2), rel=1e-6)
    assert summary["BLEU-4"] == pytest.approx(100 * brevity * (1 * 6 / 7 * 4 / 5 * 2 / 3) ** (1 / 4), rel=1e-6)


@pytest.mark.skipif(not HAS_JAVA, reason="no java on PATH: nothing to compare the fallback with")
def test_the_fallback_tokeniser_equals_ptb_on_plain_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    plain = ["A black-and-white photo, taken 1990: (two) boats [or {three}]?", '"Hi" -- she said; ok.']
    captions = {i: refs + [hyp] for i, refs, hyp in CAPTIONS} | {"x": plain}
    ptb = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    assert ptb == {k: [fallback_tokens(c) for c in v] for k, v in captions.items()}


def test_without_java_meteor_and_spice_are_skipped_with_a_note():
    items, outcomes, _ = caption_set()
    metric = CaptionMetric(java=False)
    summary = metric.summarize(items, outcomes)
    assert "METEOR" not in summary and "SPICE" not in summary
    assert any("METEOR and SPICE skipped" in note for note in metric.notes)


@pytest.mark.skipif(not HAS_JAVA, reason="no java on PATH: METEOR needs it")
def test_meteor_scores_each_image_and_spice_without_its_jars_is_skipped_with_a_note():
    items = [Item("same", Path("s.jpg"), reference=["a red bus on a street"]),
             Item("other", Path("o.jpg"), reference=["two dogs in the snow"])]
    metric = CaptionMetric(java=True)
    scores = metric.evaluate(items, [outcome("same", "A red bus on a street."), outcome("other", "a plate of food")])
    assert scores.per_item["same"]["METEOR"] > 90 and scores.per_item["other"]["METEOR"] < 10
    assert 0 < scores.summary["METEOR"] < 100
    assert ("SPICE" in scores.summary) == metric.spice
    assert metric.spice or any("SPICE skipped" in note for note in metric.notes)


def test_captions_need_reference_lists():
    with pytest.raises(ComneckInputError, match=r"x\.jpg: caption item 'x' needs a list of reference captions"):
        CaptionMetric(java=False).summarize([Item("x", Path("x.jpg"), reference="a cat")], [outcome("x", "a cat")])


# -- mcq ----------------------------------------------------------------------------------------


def test_mcq_is_honeybees_seed_rule_overall_and_per_dimension():
    """calc_seed_score: pred.strip().lower() == answer.strip().lower()."""
    cases = [("A", "A", "scene"), (" b\n", "B", "scene"), ("A.", "A", "scene"), ("C", "D", "count"), ("d", "D", "count")]
    items = [Item(str(k), Path(f"{k}.jpg"), choices=("w", "x", "y", "z"), reference=ref, group=g) for k, (_, ref, g) in enumerate(cases)]
    outcomes = [outcome(str(k), text, {"choice": text.strip()[:1].upper()}) for k, (text, _, _) in enumerate(cases)]
    summary = metric_for("mcq").summarize(items, outcomes)
    assert summary == {"accuracy": 60.0, "accuracy/count": 50.0, "accuracy/scene": pytest.approx(200 / 3),
                       "count": 5.0, "count/count": 2.0, "count/scene": 3.0}


# -- rec ----------------------------------------------------------------------------------------


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def test_rec_counts_iou_over_one_half_on_photo_boxes_mapped_back_from_the_white_square():
    """A 640 x 427 photo on its 640 x 640 white square sits 106 px down: the square's box
    [0.1, 0.3, 0.5, 0.7] is the photo's [64, 86, 320, 342]. Against [64, 86, 320, 214] its IoU is
    exactly 0.5 (wrong: Shikra counts IoU > 0.5), against [64, 86, 320, 300] 214/256 (right)."""
    box = frame_to_photo([0.1, 0.3, 0.5, 0.7], (427, 640), "pad-square-white", 224)
    assert box == pytest.approx([64, 86, 320, 342])
    references = {"half": [64, 86, 320, 214], "most": [64, 86, 320, 300], "none": [10, 10, 50, 60], "shifted": [100, 100, 300, 300]}
    groups = {"half": "refcoco", "most": "refcoco", "none": "refcoco+", "shifted": "refcoco+"}
    items = [Item(k, Path(f"{k}.jpg"), reference=ref, group=groups[k]) for k, ref in references.items()]
    outcomes = [outcome(k, "[0.1,0.3,0.5,0.7]", {"box_pixels": box}) for k in references if k != "none"]
    outcomes.append(outcome("none", "a cat", {"box": None}))  # no box: [0, 0, 0, 0] officially, IoU 0
    scores = metric_for("rec").evaluate(items, outcomes)
    assert iou(box, references["half"]) == 0.5 and scores.per_item["half"]["Acc@0.5"] == 0
    assert scores.per_item["most"] == {"Acc@0.5": 100.0, "IoU": pytest.approx(214 / 256), "answered": 100.0}
    assert scores.per_item["none"] == {"Acc@0.5": 0.0, "IoU": 0.0, "answered": 0.0}
    assert scores.per_item["shifted"]["IoU"] == pytest.approx(iou(box, references["shifted"]))
    shifted_right = 100.0 * (iou(box, references["shifted"]) > 0.5)
    assert scores.summary["Acc@0.5"] == pytest.approx((100 + shifted_right) / 4)
    assert scores.summary["Acc@0.5/refcoco"] == 50.0 and scores.summary["Acc@0.5/refcoco+"] == shifted_right / 2
    assert scores.summary["answered"] == 75.0 and scores.summary["count"] == 4


def test_rec_refuses_a_reference_that_is_no_box():
    with pytest.raises(ComneckInputError, match=r"p\.jpg: REC item 'p' needs a box"):
        BoxAccuracy().score(Item("p", Path("p.jpg"), reference=[5, 5, 5, 9]), outcome("p"))


# -- fewshot and classify -----------------------------------------------------------------------


def test_fewshot_is_v2ls_prefix_rule_and_class_match():
    """codec_V2L_fewshot.py: pred_text[:len(target)] == target, case-sensitive, on the decoded text."""
    ranked = lambda *labels: [{"label": label, "logprob": -k} for k, label in enumerate(labels)]  # noqa: E731
    cases = {
        "exact": ("great_white_shark", "great_white_shark</s></s>", ranked("great_white_shark", "tench")),
        "prefix": ("tiger", "tiger_shark", ranked("tiger_shark", "tiger")),  # counted right by the official rule
        "case": ("tench", "Tench", ranked("tench", "goldfish")),
        "no details": ("goldfish", None, None),
    }
    items = [Item(k, Path(f"{k}.jpg"), reference=ref) for k, (ref, _, _) in cases.items()]
    outcomes = [outcome(k, text="goldfish", details={} if gen is None else {"class": None, "generated": gen, "labels": labels})
                for k, (_, gen, labels) in cases.items()]
    scores = metric_for("fewshot").evaluate(items, outcomes)
    assert {k: s["accuracy"] for k, s in scores.per_item.items()} == {"exact": 100, "prefix": 100, "case": 0, "no details": 100}
    assert {k: s.get("class accuracy") for k, s in scores.per_item.items()} == {"exact": 100, "prefix": 0, "case": 100, "no details": None}
    assert scores.summary == {"accuracy": 75.0, "class accuracy": pytest.approx(200 / 3), "count": 4.0}


def test_classify_top1_and_top5_where_five_labels_are_ranked():
    labels = [{"label": name, "probability": 0.1} for name in ["cat", "dog", "cow", "hen", "fox", "owl"]]
    items = [Item(k, Path(f"{k}.jpg"), reference=ref) for k, ref in [("a", "cat"), ("b", "fox"), ("c", "owl"), ("d", "dog")]]
    outcomes = [outcome("a", "cat", {"labels": labels}), outcome("b", "cat", {"labels": labels}),
                outcome("c", "cat", {"labels": labels}), outcome("d", "cat", {"labels": labels[:2]})]
    summary = metric_for("classify").summarize(items, outcomes)
    assert summary == {"top-1": 25.0, "top-5": pytest.approx(200 / 3), "count": 4.0}


# -- human --------------------------------------------------------------------------------------


def constant(value: int, side: int = 256) -> torch.Tensor:
    return torch.full((1, 3, side, side), value / 255)


def test_psnr_and_ms_ssim_of_constant_images_by_hand():
    """8-bit 128 against 129 + d: MSE d^2, PSNR 20 log10(255 / d). Constant images have contrast-
    structure 1 at every scale, so MS-SSIM is the last scale's luminance term to its weight
    0.1333: ((2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1))^0.1333 with C1 = (0.01 * 255)^2
    (pytorch_msssim in float32 is within 2e-4 of it)."""
    metric = HumanViewing(frame=lambda path: constant(128))
    items = [Item("one", Path("one.png")), Item("two", Path("two.png"))]
    scores = metric.evaluate(items, [outcome("one", reconstruction=constant(129)), outcome("two", reconstruction=constant(130))])
    c1 = (0.01 * 255) ** 2
    ms_ssim = {d: ((2 * 128 * (128 + d) + c1) / (128 ** 2 + (128 + d) ** 2 + c1)) ** 0.1333 for d in (1, 2)}
    for name, d in (("one", 1), ("two", 2)):
        assert scores.per_item[name]["PSNR"] == pytest.approx(20 * math.log10(255 / d), abs=1e-4)
        assert scores.per_item[name]["MS-SSIM"] == pytest.approx(ms_ssim[d], abs=2e-4)
        assert scores.per_item[name]["MS-SSIM (dB)"] == pytest.approx(-10 * math.log10(1 - scores.per_item[name]["MS-SSIM"]))
    assert scores.summary["PSNR"] == pytest.approx((20 * math.log10(255) + 20 * math.log10(255 / 2)) / 2, abs=1e-4)
    mean_ms_ssim = (scores.per_item["one"]["MS-SSIM"] + scores.per_item["two"]["MS-SSIM"]) / 2
    assert scores.summary["MS-SSIM (dB)"] == pytest.approx(-10 * math.log10(1 - mean_ms_ssim))
    assert list(scores.summary) == ["PSNR", "MS-SSIM", "MS-SSIM (dB)", "count"]


def test_psnr_rounds_both_images_to_8_bits_and_small_images_get_psnr_only():
    """Under 161 px a side: PSNR only; values are rounded to 8 bits first, as CompressAI does."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (1, 3, 64, 48)).astype(np.float64)
    noisy = np.clip(photo + rng.integers(-3, 4, photo.shape), 0, 255)
    decoded = torch.from_numpy((noisy + rng.uniform(-0.4, 0.4, photo.shape)) / 255).float()  # rounds back to noisy
    score = HumanViewing(frame=lambda path: torch.from_numpy(photo / 255).float()).score(
        Item("p", Path("p.png")), outcome("p", reconstruction=decoded))
    assert score == {"PSNR": pytest.approx(10 * math.log10(255 ** 2 / np.mean((photo - noisy) ** 2)), abs=1e-4)}


def test_the_codec_frame_is_the_photo_as_the_codec_saw_it_and_sizes_must_agree():
    frame = codec_frame("paper", 256)
    view = frame(sample_photo())
    assert view.shape == (1, 3, 256, 256)
    metric = HumanViewing(frame)
    item = Item("cow", sample_photo())
    assert metric.score(item, outcome("cow", reconstruction=view))["PSNR"] == math.inf
    with pytest.raises(ComneckInputError, match=r"cow_beach\.png: the reconstruction is \[1, 3, 128, 128\]"):
        metric.score(item, outcome("cow", reconstruction=constant(0, 128)))
    with pytest.raises(ComneckInputError, match="gave no reconstruction"):
        metric.score(item, outcome("cow"))


# -- the registry -------------------------------------------------------------------------------


def test_every_task_has_a_metric_and_unknown_tasks_are_refused():
    assert {task: metric_for(task).name for task in EVAL_TASKS} == {
        "caption": "CIDEr", "mcq": "accuracy", "rec": "Acc@0.5", "fewshot": "accuracy", "classify": "top-1", "human": "PSNR"}
    with pytest.raises(ComneckInputError, match="unknown eval task 'vqa'") as caught:
        metric_for("vqa")
    assert caught.value.code is ErrorCode.UNKNOWN_TASK


def test_a_summary_covers_one_pipeline_and_point_of_known_items():
    items = [Item("a", Path("a.jpg"), reference="A")]
    with pytest.raises(ComneckInputError, match="one \\(pipeline, point\\)"):
        metric_for("mcq").summarize(items, [outcome("a", "A"), outcome("a", "A", point="q90")])
    with pytest.raises(ComneckInputError, match="items the dataset does not hold: \\['b'\\]"):
        metric_for("mcq").summarize(items, [outcome("b", "A")])
    assert metric_for("mcq").summarize(items, [])["count"] == 0
