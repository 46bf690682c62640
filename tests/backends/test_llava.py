"""LLaVA on tiny llava-hf checkpoints, against transformers' own LlavaForConditionalGeneration."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import partial

import pytest
import torch
import transformers
from checkpoints import LLAVA_CONTEXT, VISION_WIDTH, load_tiny, write_llava
from references import MIXED_OPTIONS, assert_batch_equals_singles, greedy

from comneck.backends import GenerationOptions, check_backend
from comneck.backends.hf_checkpoint import llama_config
from comneck.backends.llava import CheckpointConfig, clip_requirement
from comneck.errors import ComneckInputError
from comneck.presets import PRESETS

PATCHES = 256
PROMPTS = ["What is in the photo?", "Is the cow on the left?", "Provide a one-sentence caption for the provided image."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp("llava"))


load = partial(load_tiny, "llava")


@pytest.fixture(scope="module")
def llava(tiny_models, folder):
    return load(tiny_models, folder)


def reference_model(folder) -> transformers.LlavaForConditionalGeneration:
    """transformers' LLaVA with the folder's weights, loaded its own way (no comneck code), in float32."""
    return transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def reference_embeds(model, ids: list[int], features: torch.Tensor) -> torch.Tensor:
    """The input embeddings with the model's own projector output scattered into its image tokens."""
    ids = torch.tensor(ids)
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[ids == model.config.image_token_index] = model.model.multi_modal_projector(features)
    return embeds


def copy(folder, target):
    shutil.copytree(folder, target)
    return target


def edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return folder


def test_the_prompt_is_the_model_cards_with_the_image_expanded_as_llava_hf_tokenizes_it(llava):
    tok = llava.tokenizer
    ids = llava.prompt_ids("  What is in the photo? ")
    image = tok.token_id("<image>")
    start = ids.index(image)
    assert ids[0] == tok.bos_token_id and ids[start : start + PATCHES] == [image] * PATCHES and ids.count(image) == PATCHES
    # each side of the image through sentencepiece on its own, the spaces beside it kept:
    # llava-hf's 1, [3148, 1001, 29901, 29871], 32000..., [29871, 13, 5618, ...] ("▁US" "ER" ":" "▁" | "▁" "\n" "What")
    assert ids[1:start] == tok.sp.EncodeAsIds("USER: ") and tok.sp.IdToPiece(ids[start - 1]) == "\u2581"
    assert ids[start + PATCHES :] == tok.sp.EncodeAsIds("\nWhat is in the photo? ASSISTANT:")
    assert [tok.sp.IdToPiece(i) for i in ids[start + PATCHES : start + PATCHES + 2]] == ["\u2581", "<0x0A>"]
    # a literal <image> in the request's text is text, not a second image
    assert llava.prompt_ids("What is <image>?").count(image) == PATCHES


def test_projector_first_step_logits_and_greedy_ids_equal_transformers_llava(llava, folder):
    model = reference_model(folder)
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(llava.projector(features), model.model.multi_modal_projector(features), atol=1e-5, rtol=0)
    options = GenerationOptions(max_new_tokens=6, logprobs=5)
    answers = llava.generate(features, PROMPTS, "vqa", [options] * len(features))
    for feature, prompt, answer in zip(features, PROMPTS, answers):
        assert answer.details["prompt_token_ids"] == llava.prompt_ids(prompt)
        with torch.no_grad():
            embeds = reference_embeds(model, answer.details["prompt_token_ids"], feature)
            first = torch.log_softmax(model(inputs_embeds=embeds[None]).logits[0, -1], -1)
        top = answer.details["logprobs"][0]["top_logprobs"]
        assert [t["token_id"] for t in top] == first.topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor([t["logprob"] for t in top]), first.topk(5).values, atol=1e-5, rtol=0)
        assert answer.details["token_ids"] == greedy(model, embeds, 6, llava.tokenizer.eos_token_id)
        assert answer.details["finish_reason"] in ("stop", "length")
    # a batch of three equals three single calls
    for i in range(3):
        (single,) = llava.generate(features[i : i + 1], PROMPTS[i : i + 1], "caption", [options])
        assert single.details["token_ids"] == answers[i].details["token_ids"] and single.text == answers[i].text


def test_a_batch_of_mixed_options_equals_its_items_alone(llava, folder):
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=torch.Generator().manual_seed(8))
    answers = assert_batch_equals_singles(lambda s: llava.generate(features[s], PROMPTS[s], "vqa", MIXED_OPTIONS[s]), 3)
    model = reference_model(folder)
    for feature, item, answer in zip(features, MIXED_OPTIONS, answers):
        assert all(len(step["top_logprobs"]) == item.logprobs for step in answer.details.get("logprobs", []))
        if item.temperature == 0:
            embeds = reference_embeds(model, answer.details["prompt_token_ids"], feature)
            assert answer.details["token_ids"] == greedy(model, embeds, item.max_new_tokens, llava.tokenizer.eos_token_id)


def test_both_key_layouts_in_both_formats_sharded_load_the_same_model(llava, tiny_models, tmp_path):
    reference = llava.engine.model.state_dict()
    features = torch.randn(2, PATCHES, VISION_WIDTH, generator=torch.Generator().manual_seed(4))
    options = GenerationOptions(max_new_tokens=5)
    expected = [a.details["token_ids"] for a in llava.generate(features, PROMPTS[:2], "vqa", [options] * len(features))]
    top_level_vocab = write_llava(tmp_path / "top-level", "legacy", "safetensors")
    config = json.loads((top_level_vocab / "config.json").read_text())
    del config["text_config"]["vocab_size"]  # only the top level says it, as some 4.36-era saves do
    (top_level_vocab / "config.json").write_text(json.dumps(config))
    for layout, fmt, other in [("new", "safetensors", None), ("new", "bin", None), ("legacy", "safetensors", top_level_vocab)]:
        backend = load(tiny_models, other or write_llava(tmp_path, layout, fmt))
        state = backend.engine.model.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
        assert all(torch.equal(a, b) for a, b in zip(backend.projector.state_dict().values(), llava.projector.state_dict().values()))
        assert [a.details["token_ids"] for a in backend.generate(features, PROMPTS[:2], "vqa", [options] * len(features))] == expected


def test_published_text_and_vision_configs_read_as_transformers_reads_them(tmp_path):
    """llava-hf/llava-1.5-7b-hf's config.json lists a few text_config fields; the rest are LLaMA-7B's."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                          "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    }))
    tokens = type("Tokens", (), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})()
    ours = llama_config(CheckpointConfig.read(tmp_path).text, tokens, tmp_path)
    theirs = transformers.LlavaConfig.from_pretrained(tmp_path).text_config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "rope_parameters"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert (ours.hidden_size, ours.num_hidden_layers, ours.vocab_size, ours.max_position_embeddings) == (4096, 32, 32064, 4096)
    need = clip_requirement(tmp_path)
    assert need.describe() == "ViT-L-14-336 at 336 px, width 1024"
    assert need.fits(PRESETS["paper-336"].clip) and not need.fits(PRESETS["paper"].clip) and not need.fits(PRESETS["tiny-336"].clip)


@pytest.mark.parametrize("preset, size, needs", [
    ("tiny", 336, "ViT-L-14-336 at 336 px, width 64"),
    ("tiny-336", 224, "ViT-L-14 at 224 px, width 64"),
    ("paper", 224, "ViT-L-14 at 224 px, width 64"),  # the tiny checkpoint's tower is 64 wide, paper's CLIP 1024
])
def test_a_tower_of_another_clip_is_refused_at_start_up_before_the_llm_loads(preset, size, needs, tiny_models, tmp_path,
                                                                             monkeypatch):
    folder = write_llava(tmp_path, image_size=size)
    monkeypatch.setattr("comneck.backends.llava.llm_engine", lambda *a: pytest.fail("loaded the LLM"))
    clip = PRESETS[preset].clip
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, folder, clip_config=clip)  # the backend reads no CLIP weights: the tiny models' serve any preset
    assert info.value.code == "bad_settings" and "\n" not in str(info.value)
    assert f"backend llava reads {needs}; this gateway's preset runs {clip.describe()}, width {clip.width}" in str(info.value)


def test_the_server_refuses_a_336_px_checkpoint_on_the_tiny_preset_at_start_up(tmp_path, capsys):
    from comneck_server.cli import main

    folder = write_llava(tmp_path, image_size=336)
    assert main(["--preset", "tiny", "--backend", f"llava={folder}"]) == 2
    assert capsys.readouterr().err == ("comneck-server: error: backend llava reads ViT-L-14-336 at 336 px, width 64; this gateway's "
                                       "preset runs tiny-ViT-14 (standing in for ViT-L-14) at 224 px, width 64\n")


def test_a_336_px_checkpoint_serves_the_tiny_336_preset_with_576_image_tokens(tiny_models, tmp_path):
    folder = write_llava(tmp_path, image_size=336)
    assert check_backend("llava", folder, PRESETS["tiny-336"].clip, 2).clip.describe() == "ViT-L-14-336 at 336 px, width 64"
    backend = load(tiny_models, folder, clip_config=PRESETS["tiny-336"].clip)
    features = torch.randn(1, 576, VISION_WIDTH, generator=torch.Generator().manual_seed(6))
    (answer,) = backend.generate(features, PROMPTS[:1], "vqa", [GenerationOptions(max_new_tokens=6, logprobs=1)])
    assert answer.details["prompt_token_ids"].count(backend.image_token) == 576
    model = reference_model(folder)
    with torch.no_grad():
        embeds = reference_embeds(model, answer.details["prompt_token_ids"], features[0])
    assert answer.details["token_ids"] == greedy(model, embeds, 6, backend.tokenizer.eos_token_id)


@pytest.mark.parametrize("fields, message", [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full' is not served"),
    ({"vision_feature_layer": -1}, "vision_feature_layer -1 is not served"),
    ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer [-2, -5] is not served"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu' is not served"),
    ({"model_type": "llava_next"}, "config.json is not a llava config (model_type 'llava_next')"),
    ({"vision_config": {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14, "hidden_size": 1152}},
     "the vision tower is a 'siglip_vision_model'"),
])
def test_features_the_gateway_cannot_give_are_refused_at_start_up(fields, message, folder, tmp_path):
    bad = edit_config(copy(folder, tmp_path / "bad"), **fields)
    with pytest.raises(ComneckInputError) as info:
        check_backend("llava", bad, PRESETS["tiny"].clip, 2)
    assert info.value.code == "bad_weights" and message in str(info.value) and "\n" not in str(info.value)


def test_bad_folders_are_refused_in_one_line(tiny_models, folder, tmp_path):
    missing_shard = copy(folder, tmp_path / "missing-shard")
    next(missing_shard.glob("pytorch_model-00002-*.bin")).unlink()
    wrong_key, unknown_key, no_projector = (copy(folder, tmp_path / name) for name in ("wrong-key", "unknown-key", "no-projector"))
    for target, edit in [(wrong_key, lambda s: s.update({"language_model.model.norm.weights": s.pop("language_model.model.norm.weight")})),
                         (unknown_key, lambda s: s.update({"mm_projector.weight": s.pop("language_model.model.norm.weight")})),
                         (no_projector, lambda s: s.pop("multi_modal_projector.linear_2.bias"))]:
        index = json.loads((target / "pytorch_model.bin.index.json").read_text())["weight_map"]
        shard = target / (index["language_model.model.norm.weight"] if target != no_projector else index["multi_modal_projector.linear_2.bias"])
        state = torch.load(shard, weights_only=True)
        edit(state)
        torch.save(state, shard)
    vocab = edit_config(copy(folder, tmp_path / "vocab"), vocab_size=421)
    config = json.loads((vocab / "config.json").read_text())
    edit_config(vocab, text_config={**config["text_config"], "vocab_size": 421})
    image_token = edit_config(copy(folder, tmp_path / "image-token"), image_token_index=5)
    cases = {
        missing_shard: "shard pytorch_model-00002-of-00003.bin listed in pytorch_model.bin.index.json is missing",
        wrong_key: "unexpected weight 'model.norm.weights'",
        unknown_key: "unexpected weight 'mm_projector.weight' (neither layout's",
        no_projector: "1 weights missing, e.g. 'linear_2.bias'",
        vocab: "the tokenizer has 422 tokens, more than the 421 rows of the embedding matrix",
        image_token: "image_token_index 5 is not the tokenizer's <image> (420)",
    }
    for bad, message in cases.items():
        with pytest.raises(ComneckInputError) as info:
            load(tiny_models, bad)
        assert info.value.code == "bad_weights" and message in str(info.value) and "\n" not in str(info.value), bad.name


def test_a_prompt_and_answer_over_the_context_are_refused(llava):
    for prompt, options in [("word " * LLAVA_CONTEXT, GenerationOptions()), ("What?", GenerationOptions(max_new_tokens=1000))]:
        with pytest.raises(ComneckInputError) as info:
            llava.check_prompt(prompt, "vqa", options)
        assert info.value.code == "prompt_too_long" and f"llava's context of {LLAVA_CONTEXT}" in str(info.value)
    llava.check_prompt("What?", "caption", GenerationOptions(max_new_tokens=700))


def test_the_start_up_check_reads_the_config_without_transformers_or_sentencepiece(folder):
    """open_clip has imported transformers' core before; the check adds none of it (no LLaMA, no tokenizer)."""
    code = ("import sys; from comneck.backends import check_backend; from comneck.presets import PRESETS; before = set(sys.modules); "
            f"spec = check_backend('llava', {str(folder)!r}, PRESETS['tiny'].clip, 2); "
            "new = [m for m in set(sys.modules) - before if m.split('.')[0] in ('transformers', 'sentencepiece')]; "
            "assert 'comneck.backends.llava' in sys.modules and not new, new; print(spec.clip.describe())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ViT-L-14 at 224 px, width 64"


def test_http_round_trip_on_the_tiny_preset(folder, tiny):
    from comneck_edge import EdgeEncoder, GatewayError
    from comneck_server.demo import local_gateway

    from comneck.image import sample_photo

    data = EdgeEncoder(tiny, resize="pad-square").encode_file(sample_photo()).data
    with local_gateway("tiny", "--backend", f"llava={folder}") as gateway:
        (listed,) = [b for b in gateway.models()["comneck"]["backends"] if b["name"] == "llava"]
        assert listed["clip"] == "ViT-L-14 at 224 px, width 64" and listed["tasks"] == ["vqa", "caption"]
        for fmt in ("msgpack", "multipart"):
            answer = gateway.infer(data, "What is in the photo?", backend="llava", options={"max_new_tokens": 4}, fmt=fmt)
            assert answer["backend"] == "llava" and answer["task"] == "vqa" and answer["random_weights"]
            assert len(answer["details"]["token_ids"]) <= 4 and "resize_note" not in answer["details"]
        cropped = EdgeEncoder(tiny, resize="paper").encode_file(sample_photo()).data
        caption = gateway.infer(cropped, PROMPTS[2], backend="llava", task="caption", options={"max_new_tokens": 2})
        assert caption["task"] == "caption" and "expects photos framed with --resize pad-square" in caption["details"]["resize_note"]
        with pytest.raises(GatewayError) as info:
            gateway.infer(data, "word " * 790, backend="llava")
        assert (info.value.status, info.value.code) == (422, "prompt_too_long") and "llava's context" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_in_each_dtype_matches_the_cpu_and_batches_like_singles(folder, tiny_models, llava, dtype):
    """float32 on CUDA gives the CPU's tokens, and a batch gives what single calls give; the half
    types still rank the CPU's first token in their top 3, with finite log-probabilities."""
    import math

    backend = load(tiny_models, folder, device="cuda", dtype=dtype)
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=torch.Generator().manual_seed(5))
    prompts, options = ["What is in the photo?", "Where is the cow?", "Describe it."], GenerationOptions(max_new_tokens=6, logprobs=3)
    on_cpu = llava.generate(features, prompts, "vqa", [options] * len(features))
    on_gpu = backend.generate(features.cuda().to(dtype), prompts, "vqa", [options] * len(features))
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert cpu.details["logprobs"][0]["token_id"] in [t["token_id"] for t in gpu.details["logprobs"][0]["top_logprobs"]]
        assert all(math.isfinite(t["logprob"]) for step in gpu.details["logprobs"] for t in step["top_logprobs"])
    if dtype == torch.float32:
        assert [a.details["token_ids"] for a in on_gpu] == [a.details["token_ids"] for a in on_cpu]
        singles = [backend.generate(features[i : i + 1].cuda(), prompts[i : i + 1], "vqa", [options])[0] for i in range(3)]
        assert [a.details["token_ids"] for a in singles] == [a.details["token_ids"] for a in on_gpu]
