import dataclasses
import math
from pathlib import Path

import pytest
import torch

from comneck.backends import BACKENDS, BackendSpec, ClipRequirement, GenerationOptions, load_backend, parse_backend_arg
from comneck.backends.clip_zero_shot import parse_labels
from comneck.clip_split import ClipFeatures, ClipTap
from comneck.errors import ComneckInputError
from comneck.zero_shot import TEMPLATE


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


def zero_shot(models, weights=None):
    preset = models.preset
    return load_backend("clip-zero-shot", weights, clip_model=models.clip_model, clip_config=preset.clip, split_block=preset.split_block)


def test_zero_shot_equals_clip_zero_shot_classification(tiny_models):
    """Probabilities equal CLIP's own recipe: normalised embeddings, logit scale, softmax; per item of a batch."""
    clip = tiny_models.clip_model
    backend = zero_shot(tiny_models)
    images = torch.randn(2, clip.visual.output_dim, generator=torch.Generator().manual_seed(3))
    prompts = ["Labels: cow, horse, beach", "dog; city street"]
    answers = backend.generate(images, prompts, "classify", [GenerationOptions(top_k=2)] * 2)
    for image, labels, answer in zip(images, (["cow", "horse", "beach"], ["dog", "city street"]), answers):
        with torch.no_grad():
            text = clip.encode_text(backend.tokenizer([TEMPLATE.format(x) for x in labels]), normalize=True)
            probs = (clip.logit_scale.exp() * torch.nn.functional.normalize(image[None], dim=-1) @ text.T).softmax(-1)[0]
        order = probs.argsort(descending=True).tolist()
        assert answer.text == labels[order[0]]
        assert [d["label"] for d in answer.details["labels"]] == [labels[i] for i in order[:2]]
        assert [d["probability"] for d in answer.details["labels"]] == pytest.approx(probs[order[:2]].tolist(), abs=1e-6)
        assert "logprobs" not in answer.details
    # the request's choices are the labels, the prompt then only a question
    chosen = backend.generate(images, ["What is it?"] * 2, "classify", [GenerationOptions(top_k=2)] * 2,
                              choices=[["cow", "horse", "beach"], ["dog", "city street"]])
    assert [a.details for a in chosen] == [a.details for a in answers]
    (ranked,) = backend.generate(images[:1], prompts[:1], "classify", [GenerationOptions(logprobs=3)])
    assert [d["label"] for d in ranked.details["logprobs"]] == [d["label"] for d in ranked.details["labels"]][:3]
    assert [d["logprob"] for d in ranked.details["logprobs"]] == pytest.approx(
        [math.log(d["probability"]) for d in ranked.details["labels"][:3]], abs=1e-4)
    # each item ranks as many labels, and reports as many logprobs, as its own options ask
    mixed = backend.generate(images, prompts, "classify", [GenerationOptions(logprobs=3), GenerationOptions(top_k=1)])
    assert mixed[0].details == ranked.details and "logprobs" not in mixed[1].details
    assert mixed[1].details["labels"] == answers[1].details["labels"][:1] and mixed[1].text == answers[1].text


def test_backend_registry(tiny_models):
    assert parse_backend_arg("clip-zero-shot") == ("clip-zero-shot", None, {})
    assert parse_backend_arg("clip-zero-shot=/w/x") == ("clip-zero-shot", Path("/w/x"), {})
    assert parse_backend_arg("shikra=/w/delta, base=/w/llama") == ("shikra", Path("/w/delta"), {"base": "/w/llama"})
    backend = zero_shot(tiny_models)
    assert backend.spec is BACKENDS["clip-zero-shot"]
    assert backend.spec.tap == ClipTap("embedding", tokens="cls") and backend.spec.tasks == ("classify",)
    assert backend.random_weights
    for bad in ("llava-99", "", "llava-99=/w"):
        with pytest.raises(ComneckInputError) as info:
            parse_backend_arg(bad)
        assert info.value.code == "unknown_backend"
    for bad in ("clip-zero-shot=", "clip-zero-shot=/w,base=/b", "shikra=/w,bass=/b", "shikra=/w,base="):
        with pytest.raises(ComneckInputError) as info:
            parse_backend_arg(bad)
        assert info.value.code == "bad_settings"


@pytest.fixture
def registered(monkeypatch):
    """A backend whose published weights read CLIP ViT-L/14 block 23 (as Shikra's do)."""
    spec = BackendSpec(
        name="test-llm", target="comneck.backends.clip_zero_shot:ClipZeroShot", description="test", tasks=("classify",),
        tap=ClipTap("hidden", block=-2, tokens="patches"), clip=ClipRequirement("ViT-L-14", 224), packages=("torch",),
    )
    monkeypatch.setitem(BACKENDS, spec.name, spec)
    return spec


def test_a_backend_whose_clip_does_not_match_is_refused_in_one_line(registered, monkeypatch, tiny_models, tmp_path):
    weights = tmp_path / "published"
    weights.mkdir()
    # the tiny CLIP stands in for ViT-L/14 at 224 px: weights for that tower pass the check
    assert load_backend("test-llm", weights, clip_model=tiny_models.clip_model, clip_config=tiny_models.preset.clip, split_block=2)
    monkeypatch.setitem(BACKENDS, "test-llm", dataclasses.replace(registered, clip=ClipRequirement("ViT-L-14-336", 336)))
    with pytest.raises(ComneckInputError) as info:
        load_backend("test-llm", weights, clip_model=tiny_models.clip_model, clip_config=tiny_models.preset.clip, split_block=2)
    assert info.value.code == "bad_settings" and "\n" not in str(info.value)
    assert str(info.value) == ("backend test-llm reads ViT-L-14-336 at 336 px; this gateway's preset runs tiny-ViT-14 "
                               "(standing in for ViT-L-14) at 224 px")
    # without published weights it is built at the loaded CLIP's size: no mismatch
    assert load_backend("test-llm", clip_model=tiny_models.clip_model, clip_config=tiny_models.preset.clip, split_block=2)


def test_a_tap_inside_the_replaced_blocks_is_refused(registered, monkeypatch, tiny_models):
    monkeypatch.setitem(BACKENDS, "test-llm", dataclasses.replace(registered, tap=ClipTap("hidden", block=2)))
    with pytest.raises(ComneckInputError) as info:
        load_backend("test-llm", clip_model=tiny_models.clip_model, clip_config=tiny_models.preset.clip, split_block=2)
    assert info.value.code == "bad_tap" and "the CLIP tail starts at block 3" in str(info.value)


def test_missing_packages_and_weights_are_refused_with_the_install_hint(registered, monkeypatch, tiny_models):
    monkeypatch.setitem(BACKENDS, "test-llm", dataclasses.replace(registered, packages=("no_such_package_x",), extra="llm"))
    with pytest.raises(ComneckInputError) as info:
        load_backend("test-llm", clip_model=tiny_models.clip_model, clip_config=tiny_models.preset.clip, split_block=2)
    assert str(info.value) == "backend test-llm needs no_such_package_x: pip install 'comneck[llm]'"
    monkeypatch.setitem(BACKENDS, "test-llm", dataclasses.replace(registered, random_init=False, weight_files=("model.safetensors",)))
    with pytest.raises(ComneckInputError) as info:
        load_backend("test-llm", clip_model=tiny_models.clip_model, clip_config=tiny_models.preset.clip, split_block=2)
    assert "give its weights (model.safetensors)" in str(info.value)


def test_the_server_refuses_a_mismatched_backend_at_start_up(registered, monkeypatch, tmp_path, capsys):
    from comneck_server.cli import main

    monkeypatch.setitem(BACKENDS, "test-llm", dataclasses.replace(registered, clip=ClipRequirement("ViT-L-14-336", 336)))
    weights = tmp_path / "published"
    weights.mkdir()
    assert main(["--preset", "tiny", "--backend", f"test-llm={weights}"]) == 2
    err = capsys.readouterr().err
    assert err == ("comneck-server: error: backend test-llm reads ViT-L-14-336 at 336 px; this gateway's preset runs tiny-ViT-14 "
                   "(standing in for ViT-L-14) at 224 px\n")
    assert main(["--preset", "tiny", "--backend", "clip-zero-shot", "--backend", "clip-zero-shot"]) == 2
    assert "given twice" in capsys.readouterr().err
