"""Honeybee on tiny checkpoints in the release-era layout, against transformers' own
LlamaForCausalLM and the C-Abstractor's published equations."""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import torch
import transformers
from checkpoints import HEADS, HIDDEN, HONEYBEE_PROJECTOR, INTERMEDIATE, LAYERS, VISION_WIDTH, load_tiny, write_honeybee
from references import MIXED_OPTIONS, assert_batch_equals_singles
from test_c_abstractor import reference as abstractor_reference

from comneck.backends import GenerationOptions, check_backend
from comneck.backends.engines import Generation
from comneck.backends.honeybee import pick, render
from comneck.errors import ComneckInputError
from comneck.presets import get_preset

PATCHES = 256
VISUAL = 16 + 1  # 4x4 queries and one eos token
CHOICES = ["a cow", "a horse", "a dog", "the beach"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_honeybee(tmp_path_factory.mktemp("honeybee"))


load = partial(load_tiny, "honeybee")


@pytest.fixture(scope="module")
def honeybee(tiny_models, folders):
    return load(tiny_models, folders.checkpoint, tokenizer=str(folders.tokenizer))


def checkpoint_state(folder) -> dict[str, torch.Tensor]:
    state = {}
    for name in sorted(folder.glob("pytorch_model-*.bin")):
        state.update(torch.load(name, weights_only=True))
    return state


def reference_model(folder) -> transformers.LlamaForCausalLM:
    """transformers' LLaMA with the checkpoint's language_model.* weights, loaded its own way."""
    state = {k.removeprefix("language_model."): v.float() for k, v in checkpoint_state(folder).items() if k.startswith("language_model.")}
    config = transformers.LlamaConfig(vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=HIDDEN,
                                      intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      max_position_embeddings=512, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(state)
    return model


def reference_connector(folder, features: torch.Tensor) -> torch.Tensor:
    """The C-Abstractor's equations, in float64, on the checkpoint's abstractor.* weights."""
    state = {k.removeprefix("abstractor."): v.double() for k, v in checkpoint_state(folder).items() if k.startswith("abstractor.")}
    return abstractor_reference(features.double(), state, 16, 4, num_eos_tokens=1)


def reference_ids(tokenizer_folder, text: str) -> list[int]:
    """The release-era processor: BOS, the text split only at <image>, each piece through
    sentencepiece alone, the image as 17 slots of -1."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_folder / "tokenizer.model"))
    before, after = text.split("<image>")
    return [sp.bos_id(), *sp.encode(before), *[-1] * VISUAL, *sp.encode(after)]


def test_the_prompt_is_the_official_seed_bench_string_and_its_release_era_ids(honeybee, folders):
    expected = ("The following is a conversation between a curious human and AI assistant.\n"
                "Human: <image>\n"
                "Human: Answer with the option's letter from the given choices directly. Which animal is it?\n"
                "There are several options:\nA. a cow\nB. a horse\nC. a dog\nD. the beach\n\n"
                "AI: ")
    assert render("Which animal is it?", CHOICES) == expected
    assert render("What is in the photo?") == ("The following is a conversation between a curious human and AI assistant.\n"
                                               "Human: <image>\nHuman: What is in the photo?\nAI: ")
    ids = honeybee.prompt_ids("Which animal is it?", CHOICES)
    assert ids == reference_ids(folders.tokenizer, expected)
    # the piece after the image starts with sentencepiece's dummy-prefix space, and the prompt ends on "▁" (the trailing space)
    sp = honeybee.tokenizer.sp
    assert sp.IdToPiece(ids[ids.index(-1) + VISUAL]) == "\u2581" and sp.IdToPiece(ids[-1]) == "\u2581"


def test_connector_first_step_logits_and_greedy_ids_equal_the_references(honeybee, folders):
    model = reference_model(folders.checkpoint)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=g)
    prompts = ["Which animal is it?", "What is in the photo?", "Where is it?"]
    choices = [CHOICES, [], CHOICES[:2]]
    visual = reference_connector(folders.checkpoint, features)
    torch.testing.assert_close(honeybee.abstractor(features).double(), visual, atol=1e-5, rtol=0)
    options = GenerationOptions(max_new_tokens=6, logprobs=5)
    answers = honeybee.generate(features, prompts, "vqa", [options] * len(features), choices=choices)
    for i, (prompt, offered, answer) in enumerate(zip(prompts, choices, answers)):
        ids = reference_ids(folders.tokenizer, render(prompt, offered))
        assert answer.details["prompt_token_ids"] == ids
        embeds = model.get_input_embeddings()(torch.tensor([max(t, 0) for t in ids])).detach().clone()
        embeds[torch.tensor(ids) == -1] = visual[i].float()
        with torch.no_grad():
            first = torch.log_softmax(model(inputs_embeds=embeds[None]).logits[0, -1], -1)
        top = answer.details["logprobs"][0]["top_logprobs"]
        assert [t["token_id"] for t in top] == first.topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor([t["logprob"] for t in top]), first.topk(5).values, atol=1e-5, rtol=0)
        out, seq = [], embeds
        with torch.no_grad():
            for _ in range(6):
                token = int(model(inputs_embeds=seq[None]).logits[0, -1].argmax())
                if token == 2:
                    break
                out.append(token)
                seq = torch.cat([seq, model.get_input_embeddings()(torch.tensor([token]))])
        assert answer.details["token_ids"] == out
        assert ("choice" in answer.details) is bool(offered)
    for i in range(3):  # a batch of three equals three single calls
        (single,) = honeybee.generate(features[i : i + 1], prompts[i : i + 1], "vqa", [options], choices=choices[i : i + 1])
        assert single.details["token_ids"] == answers[i].details["token_ids"]


def test_a_batch_of_mixed_options_equals_its_items_alone(honeybee):
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=torch.Generator().manual_seed(8))
    prompts, choices = ["Which animal is it?", "What is in the photo?", "Where is it?"], [CHOICES, [], CHOICES[:2]]
    answers = assert_batch_equals_singles(
        lambda s: honeybee.generate(features[s], prompts[s], "vqa", MIXED_OPTIONS[s], choices=choices[s]), 3)
    for item, answer in zip(MIXED_OPTIONS, answers):
        assert len(answer.details["token_ids"]) <= item.max_new_tokens and ("logprobs" in answer.details) is bool(item.logprobs)


@pytest.mark.parametrize("text, n, letter", [
    ("B", 4, "B"), (" b\n", 4, "B"), ("D", 4, "D"), ("E", 4, None), ("B.", 4, None), ("B. a horse", 4, None), ("", 2, None),
    ("Z", 26, "Z"),
])
def test_the_letter_is_matched_as_the_official_scorer_matches_it(text, n, letter):
    assert pick(text, ["x"] * n) == letter


def test_details_carry_the_letter_and_the_choices_text(honeybee, monkeypatch):
    features = torch.randn(2, PATCHES, VISION_WIDTH)
    replies = [Generation([5], " B", "stop"), Generation([6, 7], "a cow", "stop")]
    monkeypatch.setattr(honeybee.engine, "generate", lambda embeds, options: replies[: len(embeds)])
    picked, missed = honeybee.generate(features, ["Which?"] * 2, "vqa", [GenerationOptions()] * 2, choices=[CHOICES, CHOICES])
    assert (picked.details["choice"], picked.details["choice_text"]) == ("B", "a horse") and "choice_note" not in picked.details
    assert missed.details["choice"] is None and missed.details["choice_note"] == "the answer is not one of the letters A-D"


ANSWER = "B . a cow , isn't it ?"  # what the model may say, spaces before punctuation included


@pytest.mark.parametrize("setting", [False, True, None])
def test_answers_decode_as_the_tokenizer_folders_config_says(tiny_models, folders, tmp_path, setting):
    """clean_up_tokenization_spaces of the tokenizer_config.json beside tokenizer.model (absent:
    LlamaTokenizer's default, False), given as the folder or the file, decodes as transformers'
    own LlamaTokenizer loaded from the same folder. transformers 5 skips the clean-up for BPE
    models unless told otherwise; the release-era slow tokenizer (4.30) had no such exception,
    so the reference is told to apply it."""
    vicuna = tmp_path / "vicuna"
    shutil.copytree(folders.tokenizer, vicuna)
    if setting is not None:
        (vicuna / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": setting}))
    reference = transformers.LlamaTokenizer.from_pretrained(
        str(vicuna), clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    assert reference.clean_up_tokenization_spaces is bool(setting)
    ids = [1, *reference.encode(ANSWER, add_special_tokens=False), 2]
    expected = reference.batch_decode([ids], skip_special_tokens=True)
    assert expected == (["B. a cow, isn't it?"] if setting else [ANSWER])  # the two settings differ on this answer
    for option in (vicuna, vicuna / "tokenizer.model"):
        backend = load(tiny_models, folders.checkpoint, tokenizer=str(option))
        assert backend.tokenizer.batch_decode([ids]) == expected, option


def test_a_bad_tokenizer_config_is_refused_in_one_line(tiny_models, folders, tmp_path):
    vicuna = tmp_path / "vicuna"
    shutil.copytree(folders.tokenizer, vicuna)
    for content, message in (('{"clean_up_tokenization_spaces": "no"}', "clean_up_tokenization_spaces is 'no'; expected true or false"),
                             ("{not json", "tokenizer_config.json: not JSON")):
        (vicuna / "tokenizer_config.json").write_text(content)
        with pytest.raises(ComneckInputError) as info:
            load(tiny_models, folders.checkpoint, tokenizer=str(vicuna))
        assert info.value.code == "bad_weights" and message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_safetensors_and_a_tokenizer_in_the_folder_load_the_same_model(honeybee, tiny_models, tmp_path):
    other = write_honeybee(tmp_path, fmt="safetensors", tokenizer_inside=True)
    backend = load(tiny_models, other.checkpoint)
    reference = honeybee.engine.model.state_dict()
    state = backend.engine.model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    assert all(torch.equal(a, b) for a, b in zip(backend.abstractor.state_dict().values(), honeybee.abstractor.state_dict().values()))


def test_a_config_without_num_eos_tokens_takes_the_release_default_of_one(tiny_models, tmp_path):
    projector = {k: v for k, v in HONEYBEE_PROJECTOR.items() if k != "num_eos_tokens"}
    folders = write_honeybee(tmp_path, projector=projector)
    assert load(tiny_models, folders.checkpoint, tokenizer=str(folders.tokenizer)).num_visual_tokens == VISUAL
    with_none = write_honeybee(tmp_path / "none", projector={**HONEYBEE_PROJECTOR, "num_eos_tokens": 0})
    backend = load(tiny_models, with_none.checkpoint, tokenizer=str(with_none.tokenizer))
    assert backend.num_visual_tokens == 16 and backend.prompt_ids("Hi").count(-1) == 16


def test_bad_requests_get_their_own_codes(honeybee):
    cases = [
        (("word " * 400, "vqa", GenerationOptions()), "prompt_too_long"),
        (("What?", "vqa", GenerationOptions(max_new_tokens=500)), "prompt_too_long"),
        (("What is <image> here?", "vqa", GenerationOptions()), "bad_prompt"),
    ]
    for args, code in cases:
        with pytest.raises(ComneckInputError) as info:
            honeybee.check_prompt(*args)
        assert info.value.code == code and "\n" not in str(info.value)
    honeybee.check_prompt("What?", "vqa", GenerationOptions(), CHOICES)


def test_bad_folders_are_refused_in_one_line(tiny_models, folders, tmp_path):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(folders.checkpoint, target)
        return target

    config = json.loads((folders.checkpoint / "config.json").read_text())
    missing_shard = copy("missing-shard")
    next(missing_shard.glob("pytorch_model-00002-*.bin")).unlink()
    wrong_key = copy("wrong-key")
    first = next(wrong_key.glob("pytorch_model-00001-*.bin"))
    state = torch.load(first, weights_only=True)
    renamed = next(k for k in state if k.startswith("language_model.") and k.endswith("proj.weight"))
    state[renamed.replace("language_model.", "llm.")] = state.pop(renamed)
    torch.save(state, first)
    vocab = copy("vocab")
    (vocab / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"], "vocab_size": 32000}}))
    no_abstractor = copy("no-abstractor")
    for shard in no_abstractor.glob("pytorch_model-*.bin"):
        torch.save({k: v for k, v in torch.load(shard, weights_only=True).items() if not k.startswith("abstractor.")}, shard)
    not_honeybee = copy("llava")
    (not_honeybee / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    cases = {
        missing_shard: ("bad_weights", "shard pytorch_model-00002-of-00002.bin listed in pytorch_model.bin.index.json is missing"),
        wrong_key: ("bad_weights", f"unexpected weight '{renamed.replace('language_model.', 'llm.')}'"),
        vocab: ("bad_weights", "text_config says vocab_size 32000"),
        no_abstractor: ("bad_weights", "no abstractor.* weights"),
        not_honeybee: ("bad_weights", "not a Honeybee config (model_type 'llava'"),
    }
    for folder, (code, message) in cases.items():
        with pytest.raises(ComneckInputError) as info:
            load(tiny_models, folder, tokenizer=str(folders.tokenizer))
        assert info.value.code == code and message in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, folders.checkpoint)
    assert info.value.code == "bad_settings" and "no tokenizer.model" in str(info.value) and "tokenizer=PATH" in str(info.value)


def test_another_vision_tower_is_refused(tiny_models, folders, tmp_path):
    config = json.loads((folders.checkpoint / "config.json").read_text())
    tower = tmp_path / "tower"
    shutil.copytree(folders.checkpoint, tower)
    (tower / "config.json").write_text(json.dumps({**config, "vision_config": {**config["vision_config"], "image_size": 336}}))
    preset = get_preset("tiny")  # start-up refuses it from config.json, before any model loads
    with pytest.raises(ComneckInputError) as info:
        check_backend("honeybee", tower, preset.clip, preset.split_block)
    assert info.value.code == "bad_settings" and "reads ViT-L-14-336 at 336 px, width 64" in str(info.value)
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, tower, tokenizer=str(folders.tokenizer))
    assert info.value.code == "bad_settings" and "reads ViT-L-14-336 at 336 px" in str(info.value)
    wide = tmp_path / "wide"
    shutil.copytree(folders.checkpoint, wide)
    (wide / "config.json").write_text(json.dumps({**config, "vision_config": {**config["vision_config"], "hidden_size": 1280}}))
    with pytest.raises(ComneckInputError) as info:
        check_backend("honeybee", wide, preset.clip, preset.split_block)
    assert "reads ViT-L-14 at 224 px, width 1280" in str(info.value)
    for broken in ("not an object", {"image_size": "big"}):
        (wide / "config.json").write_text(json.dumps({**config, "vision_config": broken}))
        with pytest.raises(ComneckInputError) as info:
            check_backend("honeybee", wide, preset.clip, preset.split_block)
        assert info.value.code == "bad_weights" and "vision_config" in str(info.value) and "\n" not in str(info.value)
    preset = get_preset("tiny-336")  # the release's own 224 px config on a 336 px gateway
    with pytest.raises(ComneckInputError) as info:
        check_backend("honeybee", folders.checkpoint, preset.clip, preset.split_block)
    assert info.value.code == "bad_settings" and "reads ViT-L-14 at 224 px, width 64" in str(info.value)


def test_choices_are_checked_before_decoding(honeybee, tiny_models, monkeypatch):
    from comneck_edge import EdgeEncoder

    from comneck.image import sample_photo
    from comneck.pipeline import Pipeline

    data = EdgeEncoder(tiny_models.preset).encode_file(sample_photo()).data

    pipeline = Pipeline(tiny_models)
    pipeline.add_backend("clip-zero-shot")
    pipeline.backends["honeybee"] = honeybee
    monkeypatch.setattr(pipeline, "decode", lambda streams: pytest.fail("decoded a refused request"))
    cases = [
        (["only one"], "honeybee", "offers 2 to 26 choices; got 1"),
        ([str(i) for i in range(27)], "honeybee", "offers 2 to 26 choices; got 27"),
        (["a cow", "  "], "honeybee", "choice 2 is empty"),
    ]
    for offered, backend, message in cases:
        with pytest.raises(ComneckInputError) as info:
            pipeline.prepare([data], ["Which?"], backend=backend, choices=[offered])
        assert info.value.code == "bad_choices" and message in str(info.value)


def test_http_round_trip_with_choices_on_the_tiny_preset(tiny_models, tmp_path):
    from comneck_edge import EdgeEncoder, GatewayError
    from comneck_server.demo import local_gateway

    from comneck.image import sample_photo

    folders = write_honeybee(tmp_path)
    data = EdgeEncoder(tiny_models.preset, resize="stretch").encode_file(sample_photo()).data
    paper = EdgeEncoder(tiny_models.preset).encode_file(sample_photo()).data
    with local_gateway("tiny", "--backend", f"honeybee={folders.checkpoint},tokenizer={folders.tokenizer}") as gateway:
        for fmt in ("msgpack", "multipart"):
            answer = gateway.infer(data, "Which animal is it?", options={"max_new_tokens": 3}, fmt=fmt, choices=CHOICES)
            assert answer["backend"] == "honeybee" and answer["task"] == "vqa" and answer["random_weights"]
            details = answer["details"]
            assert details["choice"] == pick(answer["text"], CHOICES) and "resize_note" not in details
            assert details["prompt_token_ids"].count(-1) == VISUAL and len(details["token_ids"]) <= 3
        free = gateway.infer(paper, "What is in the photo?", options={"max_new_tokens": 2})
        assert "choice" not in free["details"] and "--resize stretch" in free["details"]["resize_note"]
        for offered in (["one"], [str(i) for i in range(27)]):
            with pytest.raises(GatewayError) as info:
                gateway.infer(data, "Which?", choices=offered)
            assert (info.value.status, info.value.code) == (422, "bad_choices")
        with pytest.raises(GatewayError) as info:
            gateway.infer(data, "word " * 400)
        assert (info.value.status, info.value.code) == (422, "prompt_too_long")
        assert gateway.infer(data, "Which?", choices=CHOICES[:2], options={"max_new_tokens": 1})["backend"] == "honeybee"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_in_each_dtype_matches_the_cpu_and_batches_like_singles(folders, tiny_models, honeybee, dtype):
    """float32 on CUDA gives the CPU's tokens, and a batch gives what single calls give; the half
    types still rank the CPU's first token in their top 3, with finite log-probabilities."""
    import math

    backend = load(tiny_models, folders.checkpoint, tokenizer=str(folders.tokenizer), device="cuda", dtype=dtype)
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=torch.Generator().manual_seed(5))
    prompts, choices = ["Which animal is it?", "What is in the photo?", "Where?"], [CHOICES, [], CHOICES[:2]]
    options = GenerationOptions(max_new_tokens=6, logprobs=3)
    on_cpu = honeybee.generate(features, prompts, "vqa", [options] * len(features), choices=choices)
    on_gpu = backend.generate(features.cuda().to(dtype), prompts, "vqa", [options] * len(features), choices=choices)
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert cpu.details["logprobs"][0]["token_id"] in [t["token_id"] for t in gpu.details["logprobs"][0]["top_logprobs"]]
        assert all(math.isfinite(t["logprob"]) for step in gpu.details["logprobs"] for t in step["top_logprobs"])
    if dtype == torch.float32:
        assert [a.details["token_ids"] for a in on_gpu] == [a.details["token_ids"] for a in on_cpu]
        singles = [backend.generate(features[i : i + 1].cuda(), prompts[i : i + 1], "vqa", [options], choices=choices[i : i + 1])[0]
                   for i in range(3)]
        assert [a.details["token_ids"] for a in singles] == [a.details["token_ids"] for a in on_gpu]
