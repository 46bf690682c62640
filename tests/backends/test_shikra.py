"""Shikra on tiny checkpoints in the published layouts, against transformers' own LlamaForCausalLM."""

from __future__ import annotations

import json
import math
import random
import shutil
from functools import partial

import pytest
import torch
import transformers
from checkpoints import HIDDEN, HEADS, INTERMEDIATE, LAYERS, VISION_WIDTH, load_tiny, write_shikra
from references import MIXED_OPTIONS, assert_batch_equals_singles, greedy

from comneck.backends import GenerationOptions
from comneck.backends.shikra import SYSTEM, TEMPLATES, parse_boxes, render, write_merged
from comneck.backends.sp_tokenizer import SentencePieceTokenizer
from comneck.errors import ComneckInputError
from comneck.image import frame_to_photo

PATCHES = 256


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_shikra(tmp_path_factory.mktemp("shikra"))


load = partial(load_tiny, "shikra")


@pytest.fixture(scope="module")
def shikra(tiny_models, folders):
    return load(tiny_models, folders.merged)


def reference_model(folder) -> transformers.LlamaForCausalLM:
    """transformers' LLaMA with the merged weights, loaded its own way (no comneck code)."""
    state = {}
    for name in sorted(folder.glob("pytorch_model-*.bin")):
        state.update(torch.load(name, weights_only=True))
    vocab = state["model.embed_tokens.weight"].shape[0]
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, max_position_embeddings=512, rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(config).eval()
    projector = torch.nn.Linear(VISION_WIDTH, HIDDEN)
    projector.weight.data = state.pop("model.mm_projector.weight").float()
    projector.bias.data = state.pop("model.mm_projector.bias").float()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.projector = projector
    return model


def reference_embeds(model, tokenizer: SentencePieceTokenizer, prompt: str, features: torch.Tensor, template: int = 0) -> torch.Tensor:
    """The official merge: the embeddings after <im_start> replaced by the projected patches."""
    text = render("rec", prompt, template).replace("<image>", "<im_start>" + "<im_patch>" * PATCHES + "<im_end>")
    ids = tokenizer.encode(text)
    embeds = model.get_input_embeddings()(torch.tensor(ids)).clone()
    start = ids.index(tokenizer.token_id("<im_start>"))
    embeds[start + 1 : start + 1 + PATCHES] = model.projector(features)
    return embeds


def test_the_prompt_is_the_official_conversation_with_the_image_expanded(shikra):
    tok = shikra.tokenizer
    ids = shikra.prompt_ids("the cow", "rec", 7)
    start = ids.index(tok.token_id("<im_start>"))
    assert ids[0] == tok.bos_token_id and ids.count(tok.token_id("<im_start>")) == 1
    assert ids[start + 1 : start + 1 + PATCHES] == [tok.token_id("<im_patch>")] * PATCHES
    assert ids[start + 1 + PATCHES] == tok.token_id("<im_end>")
    before, after = TEMPLATES["rec"][7].replace("<expr>", "the cow").split("<image>")
    # each side of the image is its own sentencepiece call, the spaces beside the image stripped
    assert ids[1:start] == tok.sp.EncodeAsIds(f"{SYSTEM} USER: {before}".rstrip())
    assert ids[start + 2 + PATCHES :] == tok.sp.EncodeAsIds(f"{after} ASSISTANT:".lstrip())
    assert tok.sp.IdToPiece(ids[start + 2 + PATCHES]).startswith("\u2581")  # the dummy-prefix space


def test_first_step_logits_and_greedy_ids_equal_transformers_llama(shikra, folders, tiny_models):
    model = reference_model(folders.merged)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=g)
    prompts = ["the cow", "a dog on the left", "the beach"]
    options = GenerationOptions(max_new_tokens=6, logprobs=5)
    answers = shikra.generate(features, prompts, "rec", [options] * len(features))
    for feature, prompt, answer in zip(features, prompts, answers):
        embeds = reference_embeds(model, shikra.tokenizer, prompt, feature)
        with torch.no_grad():
            first = torch.log_softmax(model(inputs_embeds=embeds[None]).logits[0, -1], -1)
        top = answer.details["logprobs"][0]["top_logprobs"]
        assert [t["token_id"] for t in top] == first.topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor([t["logprob"] for t in top]), first.topk(5).values, atol=1e-5, rtol=0)
        assert answer.details["token_ids"] == greedy(model, embeds, 6, shikra.tokenizer.eos_token_id)
        assert answer.details["prompt_token_ids"] == shikra.prompt_ids(prompt, "rec", 0)
    # a batch of three equals three single calls
    for i in range(3):
        (single,) = shikra.generate(features[i : i + 1], prompts[i : i + 1], "rec", [options])
        assert single.details["token_ids"] == answers[i].details["token_ids"]


def test_a_batch_of_mixed_options_and_templates_equals_its_items_alone(shikra, folders):
    """The official REC evaluation draws a template per sample: one batch mixes templates, lengths,
    logprobs counts and a seeded sampled item, and each item is answered as it is alone."""
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=torch.Generator().manual_seed(8))
    prompts = ["the cow", "a dog on the left", "the beach"]
    options = [o.model_copy(update={"template": t}) for o, t in zip(MIXED_OPTIONS, (5, 0, 17))]
    answers = assert_batch_equals_singles(lambda s: shikra.generate(features[s], prompts[s], "rec", options[s]), 3)
    model = reference_model(folders.merged)
    for feature, prompt, item, answer in zip(features, prompts, options, answers):
        assert answer.details["template"] == item.template
        assert answer.details["prompt_token_ids"] == shikra.prompt_ids(prompt, "rec", item.template)
        assert len(answer.details.get("logprobs", [])) == len(answer.details["token_ids"]) * bool(item.logprobs)
        assert all(len(step["top_logprobs"]) == item.logprobs for step in answer.details.get("logprobs", []))
        if item.temperature == 0:
            embeds = reference_embeds(model, shikra.tokenizer, prompt, feature, item.template)
            assert answer.details["token_ids"] == greedy(model, embeds, item.max_new_tokens, shikra.tokenizer.eos_token_id)


def test_delta_with_base_merged_and_converted_folders_give_the_same_model(shikra, folders, tiny_models, tmp_path):
    delta = load(tiny_models, folders.delta, base=str(folders.base))
    converted = tmp_path / "converted"
    files = write_merged(delta_weights(folders), converted, shard_bytes=20_000)
    assert len(files) > 1 and (converted / "model.safetensors.index.json").is_file()
    again = load(tiny_models, converted)
    reference = shikra.engine.model.state_dict()
    for other in (delta, again):
        state = other.engine.model.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
        assert torch.equal(other.projector.weight, shikra.projector.weight)
    features = torch.randn(1, PATCHES, VISION_WIDTH)
    assert [a.text for a in delta.generate(features, ["the cow"], "rec", [GenerationOptions(max_new_tokens=5)])] == \
        [a.text for a in shikra.generate(features, ["the cow"], "rec", [GenerationOptions(max_new_tokens=5)])]


def delta_weights(folders):
    from comneck.backends.shikra import ShikraWeights

    return ShikraWeights(folders.delta, folders.base)


def test_safetensors_shards_load_like_bin_shards(tiny_models, tmp_path, shikra):
    other = write_shikra(tmp_path, fmt="safetensors")
    reference = shikra.engine.model.state_dict()
    for backend in (load(tiny_models, other.merged), load(tiny_models, other.delta, base=str(other.base))):
        state = backend.engine.model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)  # same seed, same tensors


@pytest.mark.parametrize("text, box, note", [
    ("Answer: [0.120,0.031,0.586,0.975] .", [0.12, 0.031, 0.586, 0.975], None),
    ("no box here", None, "0 boxes"),
    ("[0.1,0.1,0.2,0.2] and [0.3,0.3,0.4,0.4]", None, "2 boxes"),
    ("[0.1,0.1,0.2,0.2;0.3,0.3,0.4,0.4]", None, "2 boxes"),
])
def test_boxes_are_read_as_the_official_rec_metric_reads_them(text, box, note):
    groups = parse_boxes(text)
    one = len(groups) == 1 and len(groups[0]) == 1
    assert (groups[0][0] if one else None) == box
    if note:
        assert sum(map(len, groups)) == int(note.split()[0])


@pytest.mark.parametrize("width, height", [(640, 427), (427, 640), (500, 500), (640, 480), (1001, 97)])
def test_boxes_in_the_white_square_map_back_as_the_official_expand2square_does(width, height):
    """Shikra's boxes are normalised to the Expand2square square: times its side max(W, H), less
    the offset Expand2square pasted the photo at ((H - W) // 2 on x when tall, (W - H) // 2 on y
    when wide), they are the photo's pixels. frame_to_photo agrees to 1e-6 px."""
    rng = random.Random(width * height)
    side = max(width, height)
    dx = (height - width) // 2 if height > width else 0
    dy = (width - height) // 2 if width > height else 0
    for _ in range(20):
        xs, ys = sorted(rng.uniform(0, 1) for _ in range(2)), sorted(rng.uniform(0, 1) for _ in range(2))
        box = [xs[0], ys[0], xs[1], ys[1]]
        official = [box[0] * side - dx, box[1] * side - dy, box[2] * side - dx, box[3] * side - dy]
        assert frame_to_photo(box, (height, width), "pad-square-white", 256) == pytest.approx(official, abs=1e-6)


def test_a_box_comes_back_in_the_photos_pixels_and_a_mis_framed_photo_is_noted(shikra, tiny_models, monkeypatch):
    from comneck_edge import EdgeEncoder

    from comneck.backends.engines import Generation
    from comneck.image import sample_photo
    from comneck.pipeline import Pipeline

    pipeline = Pipeline(tiny_models)
    pipeline.backends["shikra"] = shikra
    reply = [Generation([5, 6], "Answer: [0.100,0.250,0.600,0.750] .", "stop")]
    monkeypatch.setattr(shikra.engine, "generate", lambda embeds, options: reply * len(embeds))
    photo = sample_photo("chicken_on_money.png")
    for policy, note in (("pad-square-white", False), ("paper", True)):
        data = EdgeEncoder(tiny_models.preset, resize=policy).encode_file(photo).data
        (answer,) = pipeline.answer([data], ["the chicken"], backend="shikra")
        assert answer.details["box"] == [0.1, 0.25, 0.6, 0.75]
        # the photo is 640 x 640: either policy only scales it to 256, so the box is 640 times itself
        assert answer.details["box_pixels"] == pytest.approx([64.0, 160.0, 384.0, 480.0], abs=0.05)
        assert ("resize_note" in answer.details) is note
    with pytest.raises(ComneckInputError) as info:
        pipeline.prepare([data], ["the chicken"], backend="shikra", choices=[["left", "right"]])
    assert info.value.code == "bad_choices" and "backend shikra answers no multiple-choice questions" in str(info.value)
    # each item's prompt is checked with its own options (here its template) before any decoding
    request = pipeline.prepare([data] * 2, ["the chicken"] * 2, backend="shikra", options=[GenerationOptions(template=53), GenerationOptions()])
    assert [o.template for o in request.options] == [53, None]
    with pytest.raises(ComneckInputError) as info:
        pipeline.prepare([data] * 2, ["the chicken"] * 2, backend="shikra", options=[GenerationOptions(), GenerationOptions(template=54)])
    assert info.value.code == "unknown_template"


def test_bad_requests_get_their_own_codes(shikra):
    cases = [
        (("   ", "rec", GenerationOptions()), "bad_prompt"),
        (("the cow", "rec", GenerationOptions(template=54)), "unknown_template"),
        (("the cow", "vqa", GenerationOptions(template=140)), "unknown_template"),
        (("word " * 400, "rec", GenerationOptions()), "prompt_too_long"),
        (("the cow", "rec", GenerationOptions(max_new_tokens=300)), "prompt_too_long"),
    ]
    for args, code in cases:
        with pytest.raises(ComneckInputError) as info:
            shikra.check_prompt(*args)
        assert info.value.code == code and "\n" not in str(info.value)
    shikra.check_prompt("the cow", "caption", GenerationOptions(template=273))


def test_bad_folders_are_refused_in_one_line(tiny_models, folders, tmp_path):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(folders.merged, target)
        return target

    missing_shard = copy("missing-shard")
    next(missing_shard.glob("pytorch_model-00002-*.bin")).unlink()
    wrong_key = copy("wrong-key")
    first = next(wrong_key.glob("pytorch_model-00001-*.bin"))
    state = torch.load(first, weights_only=True)
    renamed = next(k for k in state if k.endswith("proj.weight") and "mm_projector" not in k)
    state[renamed + "s"] = state.pop(renamed)
    torch.save(state, first)
    junk = copy("junk-shard")
    next(junk.glob("pytorch_model-00002-*.bin")).write_text("not weights")
    vocab = copy("vocab")
    config = json.loads((vocab / "config.json").read_text())
    (vocab / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 5}))
    tower = copy("tower")
    (tower / "config.json").write_text(json.dumps({**config, "mm_hidden_size": 1024}))
    cases = {
        missing_shard: "shard pytorch_model-00002-of-00002.bin listed in pytorch_model.bin.index.json is missing",
        wrong_key: f"unexpected weight '{renamed}s'",
        junk: "not a safetensors, torch.save or TorchScript file",
        vocab: f"the tokenizer has {config['vocab_size']} tokens, config.json says vocab_size {config['vocab_size'] + 5}",
        tower: "mm_hidden_size 1024 is not the width 64 of this gateway's CLIP",
    }
    for folder, message in cases.items():
        with pytest.raises(ComneckInputError) as info:
            load(tiny_models, folder)
        assert info.value.code == "bad_weights" and message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, folders.merged, base=str(tmp_path / "nowhere"))
    assert info.value.code == "bad_settings" and "do not exist" in str(info.value)


def test_http_round_trip_on_the_tiny_preset(folders, tiny):
    from comneck_edge import EdgeEncoder, GatewayError
    from comneck_server.demo import local_gateway

    from comneck.image import sample_photo

    data = EdgeEncoder(tiny).encode_file(sample_photo()).data
    with local_gateway("tiny", "--backend", f"shikra={folders.delta},base={folders.base}") as gateway:
        for fmt in ("msgpack", "multipart"):
            answer = gateway.infer(data, "the cow", backend="shikra", options={"max_new_tokens": 4}, fmt=fmt)
            assert answer["backend"] == "shikra" and answer["task"] == "rec" and answer["random_weights"]
            assert len(answer["details"]["token_ids"]) <= 4 and "box" in answer["details"]
        with pytest.raises(GatewayError) as info:
            gateway.infer(data, "the cow", backend="shikra", options={"template": 99})
        assert (info.value.status, info.value.code) == (422, "unknown_template")
        assert gateway.infer(data, "the cow", backend="shikra", task="caption", options={"max_new_tokens": 2})["task"] == "caption"


def test_comneck_convert_merges_a_delta_once(folders, tmp_path, shikra, tiny_models):
    from comneck.cli import main

    out = tmp_path / "merged"
    assert main(["convert", str(folders.delta), "--base", str(folders.base), "-o", str(out)]) == 0
    state = load(tiny_models, out).engine.model.state_dict()
    reference = shikra.engine.model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert main(["convert", str(folders.delta), "--base", str(folders.base), "-o", str(out)]) == 2  # not over a full folder


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_in_each_dtype_matches_the_cpu_and_batches_like_singles(folders, tiny_models, shikra, dtype):
    """float32 on CUDA gives the CPU's tokens, and a batch gives what single calls give; the half
    types (whose rounding the random tiny LLaMA amplifies) still rank the CPU's first token in
    their top 3, with finite log-probabilities."""
    backend = load(tiny_models, folders.merged, device="cuda", dtype=dtype)
    features = torch.randn(3, PATCHES, VISION_WIDTH, generator=torch.Generator().manual_seed(5))
    prompts, options = ["the cow", "a dog on the left", "the beach"], GenerationOptions(max_new_tokens=6, logprobs=3)
    on_cpu = shikra.generate(features, prompts, "rec", [options] * len(features))
    on_gpu = backend.generate(features.cuda().to(dtype), prompts, "rec", [options] * len(features))
    for cpu, gpu in zip(on_cpu, on_gpu):
        first_cpu, first_gpu = cpu.details["logprobs"][0], gpu.details["logprobs"][0]
        assert first_cpu["token_id"] in [t["token_id"] for t in first_gpu["top_logprobs"]]
        assert all(math.isfinite(t["logprob"]) for step in gpu.details["logprobs"] for t in step["top_logprobs"])
    if dtype == torch.float32:
        assert [a.details["token_ids"] for a in on_gpu] == [a.details["token_ids"] for a in on_cpu]
        singles = [backend.generate(features[i : i + 1].cuda(), prompts[i : i + 1], "rec", [options])[0] for i in range(3)]
        assert [a.details["token_ids"] for a in singles] == [a.details["token_ids"] for a in on_gpu]
