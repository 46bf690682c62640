import pytest
import torch

from comneck.backends import BACKENDS, ClipTap, GenerationOptions, check_backend_names
from comneck.backends.clip_zero_shot import TEMPLATE, ClipZeroShot, parse_labels
from comneck.clip_split import ClipFeatures
from comneck.errors import ComneckInputError


def features(num_blocks: int = 4) -> ClipFeatures:
    g = torch.Generator().manual_seed(0)
    return ClipFeatures(
        embedding=torch.randn(1, 32, generator=g),
        post_ln=torch.randn(1, 257, 64, generator=g),
        projected=torch.randn(1, 257, 32, generator=g),
        hidden={j: torch.randn(1, 257, 64, generator=g) for j in range(1, num_blocks + 1)},
    )


def test_taps_select_what_they_name():
    f = features()
    assert ClipTap("embedding", tokens="cls").select(f, 4) is f.embedding
    assert torch.equal(ClipTap("projected").select(f, 4), f.projected)
    assert torch.equal(ClipTap("post_ln", tokens="patches").select(f, 4), f.post_ln[:, 1:])
    assert torch.equal(ClipTap("hidden", block=-2, tokens="patches").select(f, 4), f.hidden[3][:, 1:])  # Shikra-style
    assert torch.equal(ClipTap("hidden", block=4, tokens="cls").select(f, 4), f.hidden[4][:, 0])
    assert ClipTap("hidden", block=-1).block_index(24) == 24 and ClipTap("hidden", block=23).block_index(24) == 23
    assert ClipTap("post_ln").block_index(24) is None


def test_bad_taps_are_refused():
    with pytest.raises(ValueError):
        ClipTap("hidden")
    with pytest.raises(ValueError):
        ClipTap("post_ln", block=3)
    with pytest.raises(ValueError):
        ClipTap("embedding")
    with pytest.raises(ComneckInputError) as info:
        ClipTap("hidden", block=25).block_index(24)
    assert info.value.code == "bad_tap"


@pytest.mark.parametrize(
    "prompt, labels",
    [
        ("cow, horse", ["cow", "horse"]),
        ("What is in the photo? Labels: cow; horse , beach", ["cow", "horse", "beach"]),
        ("cat\ndog\ncat", ["cat", "dog"]),
    ],
)
def test_labels_come_from_the_prompt(prompt, labels):
    assert parse_labels(prompt) == labels


@pytest.mark.parametrize("prompt", ["just one label", "Labels: cow", ", ,", ",".join(f"l{i}" for i in range(65))])
def test_prompts_without_a_usable_label_list_are_refused(prompt):
    with pytest.raises(ComneckInputError) as info:
        parse_labels(prompt)
    assert info.value.code == "bad_prompt"


def test_zero_shot_equals_clip_zero_shot_classification(tiny_models):
    """Probabilities equal CLIP's own recipe: normalised embeddings, logit scale, softmax."""
    clip = tiny_models.clip_model
    backend = ClipZeroShot(clip, random_weights=True)
    image = torch.randn(1, clip.visual.output_dim, generator=torch.Generator().manual_seed(3))
    labels = ["cow", "horse", "beach"]
    answer = backend.answer(image, "Labels: cow, horse, beach", "classify", GenerationOptions(top_k=2))
    with torch.no_grad():
        text = clip.encode_text(backend.tokenizer([TEMPLATE.format(x) for x in labels]), normalize=True)
        probs = (clip.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ text.T).softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    assert answer.text == labels[order[0]]
    assert [d["label"] for d in answer.details["labels"]] == [labels[i] for i in order[:2]]
    assert [d["probability"] for d in answer.details["labels"]] == pytest.approx(probs[order[:2]].tolist(), abs=1e-6)


def test_backend_registry(tiny_models):
    assert check_backend_names(["clip-zero-shot"]) == ["clip-zero-shot"]
    backend = BACKENDS["clip-zero-shot"](tiny_models)
    assert backend.tap == ClipTap("embedding", tokens="cls") and backend.tasks == ("classify",)
    assert backend.random_weights
    for bad in (["llava-99"], []):
        with pytest.raises(ComneckInputError) as info:
            check_backend_names(bad)
        assert info.value.code == "unknown_backend"
