"""V2L on tiny files in the published layouts (the codebooks folder, v2l-decode.pth, LLaMA-2 in
Meta's format), against the published equations: Meta's LLaMA forward written out, the official
distance, the official episode prompt less its labelled query, per-position class mask and prefix
match; support sets over HTTP."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from functools import partial

import pytest
import torch
from checkpoints import V2L_WORDS, load_tiny, random_nonzero, write_v2l, write_v2l_checkpoint
from references import MIXED_OPTIONS, assert_batch_equals_singles
from test_llama_adapter import reference_logits
from test_v2l_fewshot import official_episode, without_labelled_query

from comneck.backends import GenerationOptions, SupportExample
from comneck.errors import ComneckInputError
from comneck.pipeline import Pipeline

LABELS = ["cow", "dog", "cow", "dog"]


@pytest.fixture(scope="module")
def clip_dim(tiny_models):
    return int(tiny_models.clip_model.visual.output_dim)


@pytest.fixture(scope="module")
def files(tmp_path_factory, clip_dim):
    return write_v2l(tmp_path_factory.mktemp("v2l"), clip_dim)


load = partial(load_tiny, "v2l")


@pytest.fixture(scope="module")
def v2l(tiny_models, files):
    return load(tiny_models, files.codebooks, llama=str(files.llama))


def file_rows(files) -> torch.Tensor:
    return torch.load(files.codebooks / "global_codebook_embedding.pth", weights_only=True)


def official_words(rows: torch.Tensor, embeddings: torch.Tensor, k: int = 21) -> list[str]:
    """models_v2l.py on codebook ``rows``: normalise, d = |g|² + |e|² - 2 g e^T, topk(-d), the strings joined."""
    rows = rows.double()
    g = embeddings.double() / embeddings.double().norm(dim=-1, keepdim=True)
    d = (g**2).sum(1, keepdim=True) + (rows**2).sum(1) - 2 * g @ rows.T
    return ["".join(V2L_WORDS[i] for i in row) for row in torch.topk(-d, k, dim=1).indices.tolist()]


def test_words_served_prompt_masked_decoding_and_class_scores_equal_the_reference(v2l, files):
    """The prompt checked is the official episode less its labelled query (a served query has no label)."""
    llama = {k: v.double() for k, v in torch.load(files.llama / "consolidated.00.pth", weights_only=True).items()}
    sp = v2l.tokenizer.sp
    g = torch.Generator().manual_seed(4)
    support_features, queries = torch.randn(4, v2l.codebook.width, generator=g), torch.randn(3, v2l.codebook.width, generator=g)
    words = v2l.describe(support_features)
    assert words == official_words(file_rows(files), support_features)
    support = [SupportExample(w, label) for w, label in zip(words, LABELS)]
    answers = v2l.fewshot(queries, support, [GenerationOptions()] * len(queries))
    classes = ["cow", "dog"]
    mask = torch.zeros(16, v2l.tokenizer.vocab_size)
    for c in classes:
        for j, token in enumerate(sp.encode(c) + [2]):
            mask[j, token] = 1
    for query, answer in zip(official_words(file_rows(files), queries), answers):
        episode = official_episode(sp, classes, [*zip(words, LABELS), (query, "cow")], query)  # any label: it is cut out
        ids = without_labelled_query(sp, episode, query, "cow")
        assert answer.details["prompt_token_ids"] == ids and answer.details["words"] == query
        sequence, tokens = list(ids), []
        for row in mask:  # generate_fewshot at temperature 0: argmax(softmax(logits) * mask[j]), no early stop
            token = int((torch.softmax(reference_logits(llama, None, sequence, None)[-1], -1) * row).argmax())
            tokens.append(token)
            sequence.append(token)
        assert answer.details["token_ids"] == tokens
        text = sp.decode(tokens)
        expected = next((c for c in classes if text[: len(c)] == c), None)
        assert answer.details["generated"] == text and answer.details["class"] == expected
        assert answer.text == (expected if expected is not None else text.strip())
        for entry in answer.details["labels"]:  # each class's tokens and EOS, teacher forced
            target = sp.encode(entry["label"]) + [2]
            logp = torch.log_softmax(reference_logits(llama, None, ids + target[:-1], None), -1)
            assert entry["logprob"] == pytest.approx(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(target)), abs=1e-4)
        assert [e["logprob"] for e in answer.details["labels"]] == sorted((e["logprob"] for e in answer.details["labels"]), reverse=True)
    # a batch of three with mixed options equals three single calls (V2L decodes the official way whatever they ask)
    mixed = assert_batch_equals_singles(lambda s: v2l.fewshot(queries[s], support, MIXED_OPTIONS[s]), 3)
    assert [a.details for a in mixed] == [a.details for a in answers]


def test_the_codebook_inside_v2l_decode_pth_takes_precedence(tiny_models, files, v2l, tmp_path):
    """The official load: the codebook file builds tok_embeddings_global, then the checkpoint's
    state dict (under "state_dict", or "model" for a name holding "last") replaces it when it holds
    the key. The words follow whichever codebook that leaves."""
    rows = file_rows(files)
    inside = random_nonzero(tuple(rows.shape), torch.Generator().manual_seed(7))
    features = torch.randn(4, rows.shape[1], generator=torch.Generator().manual_seed(8))
    from_file = official_words(rows, features)
    assert v2l.describe(features) == from_file
    assert official_words(inside, features) != from_file  # the two codebooks tell the images apart differently
    cases = {
        write_v2l_checkpoint(tmp_path / "v2l-decode.pth", inside): official_words(inside, features),
        write_v2l_checkpoint(tmp_path / "v2l-last.pth", inside): official_words(inside, features),
        write_v2l_checkpoint(tmp_path / "without.pth", None): from_file,
    }
    for checkpoint, expected in cases.items():
        backend = load(tiny_models, files.codebooks, llama=str(files.llama), checkpoint=str(checkpoint))
        assert backend.describe(features) == expected, checkpoint.name
    wrong = {
        "v2l-decode-wide.pth": random_nonzero((rows.shape[0], rows.shape[1] + 1), torch.Generator()),
        "v2l-decode-short.pth": random_nonzero((rows.shape[0] - 1, rows.shape[1]), torch.Generator()),
    }
    expected_shape = f"expected a float tensor of shape {list(rows.shape)}"
    for name, codebook in wrong.items():
        checkpoint = write_v2l_checkpoint(tmp_path / name, codebook)
        with pytest.raises(ComneckInputError) as info:
            load(tiny_models, files.codebooks, llama=str(files.llama), checkpoint=str(checkpoint))
        message = str(info.value)
        assert info.value.code == "bad_weights" and str(checkpoint) in message and expected_shape in message, message
        assert f"tok_embeddings_global.weight is {list(codebook.shape)}" in message and "\n" not in message
    elsewhere = tmp_path / "v2l-last-but-state_dict.pth"  # a name holding "last": the official loader reads "model"
    torch.save({"state_dict": {"tok_embeddings_global.weight": inside}}, elsewhere)
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, files.codebooks, llama=str(files.llama), checkpoint=str(elsewhere))
    assert info.value.code == "bad_weights" and "holds no 'model' dict" in str(info.value)
    pickled = tmp_path / "v2l-decode-args.pth"  # read with weights_only: no Python object beyond tensors is rebuilt
    torch.save({"state_dict": {"tok_embeddings_global.weight": inside}, "args": argparse.Namespace(stage=2)}, pickled)
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, files.codebooks, llama=str(files.llama), checkpoint=str(pickled))
    assert info.value.code == "bad_weights" and "never unpickles" in str(info.value) and "\n" not in str(info.value)


def test_bad_support_and_prompts_get_their_own_codes(v2l, tiny_models, files):
    pipeline = Pipeline(tiny_models)
    pipeline.backends["v2l"] = v2l
    from comneck_edge import EdgeEncoder

    from comneck.image import sample_photo

    data = EdgeEncoder(tiny_models.preset).encode_file(sample_photo()).data
    cases = [
        (lambda: pipeline.support([data, data], ["cow", "cow"]), "bad_support", "at least 2 classes"),
        (lambda: pipeline.support([data], ["cow", "dog"]), "bad_support", "one label per support bitstream"),
        (lambda: pipeline.support([data, data], ["cow", " "]), "bad_support", "a support label is empty"),
        (lambda: pipeline.prepare([data], [""], "fewshot", "v2l", support=pipeline.support([data, data], ["cow", "x" * 60])),
         "bad_support", "V2L decodes 16"),
        (lambda: pipeline.prepare([data], [""], "fewshot", "v2l"), "bad_support", "needs labelled support"),
        (lambda: pipeline.prepare([data], ["What is it?"], "fewshot", "v2l", support=pipeline.support([data, data], ["cow", "dog"])),
         "bad_prompt", "send an empty prompt"),
        (lambda: pipeline.prepare([data], [""], "caption", "v2l"), "unsupported_task", "does not do 'caption'"),
    ]
    for call, code, message in cases:
        with pytest.raises(ComneckInputError) as info:
            call()
        assert info.value.code == code and message in str(info.value), str(info.value)
    other = dataclasses.replace(pipeline.parse(data), fingerprint=bytes(8)).to_bytes()  # another codec's weights
    with pytest.raises(ComneckInputError) as info:
        pipeline.support([data, other], ["cow", "dog"])
    assert info.value.code == "codec_mismatch"
    with pytest.raises(ComneckInputError) as info:
        pipeline.prepare([data], [""], "rec", "shikra", support=pipeline.support([data, data], ["cow", "dog"]))
    assert info.value.code == "unknown_backend"


def test_bad_files_are_refused_in_one_line(tiny_models, files, tmp_path):
    import shutil

    import numpy as np

    def copy(name):
        target = tmp_path / name
        shutil.copytree(files.codebooks, target)
        return target

    short = copy("short")
    np.save(short / "global_vocabulary.npy", list(V2L_WORDS[:5]))
    wide = copy("wide")
    torch.save(torch.ones(len(V2L_WORDS), 7), wide / "global_codebook_embedding.pth")
    few = copy("few")
    np.save(few / "global_vocabulary.npy", list(V2L_WORDS[:8]))
    torch.save(torch.ones(8, 32), few / "global_codebook_embedding.pth")
    cases = {
        short: ("bad_weights", f"5 words for {len(V2L_WORDS)} codebook rows"),
        wide: ("bad_weights", "rows of width 7"),
        few: ("bad_weights", "8 rows, fewer than the 21 words"),
    }
    for folder, (code, message) in cases.items():
        with pytest.raises(ComneckInputError) as info:
            load(tiny_models, folder, llama=str(files.llama))
        assert info.value.code == code and message in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, files.codebooks)
    assert info.value.code == "bad_settings" and "llama=LLAMA2_FOLDER" in str(info.value)


def test_support_sets_and_inline_support_over_http(files, tiny, tmp_path):
    from comneck_edge import EdgeEncoder, GatewayError
    from comneck_server.demo import local_gateway

    from comneck.image import sample_photo

    photos = sorted(sample_photo().parent.glob("*.png"))  # the chicken and the cow
    labelled = list(zip((EdgeEncoder(tiny).encode_file(p).data for p in photos), ["chicken", "cow"]))
    query = EdgeEncoder(tiny, resize="pad-square").encode_file(photos[1]).data  # the cow framed another way
    flags = ("--backend", "clip-zero-shot", "--backend", f"v2l={files.codebooks},llama={files.llama}")
    with local_gateway("tiny", *flags) as gateway:
        inline = [gateway.infer(query, "", task="fewshot", support=labelled, fmt=fmt) for fmt in ("msgpack", "multipart")]
        assert inline[0]["backend"] == "v2l" and inline[0]["details"] == inline[1]["details"]
        assert {e["label"] for e in inline[0]["details"]["labels"]} == {"chicken", "cow"}
        made = gateway.register_support_set("farm", labelled, fmt="multipart")
        assert made == {"name": "farm", "backend": "v2l", "classes": ["chicken", "cow"], "examples": 2}
        named = gateway.infer(query, "", task="fewshot", support_set="farm")
        assert named["details"] == inline[0]["details"]  # the same words, kept from registration
        assert gateway.support_sets() == [made]
        refusals = [
            (lambda: gateway.infer(query, "", task="fewshot", support_set="nope"), 404, "unknown_support_set"),
            (lambda: gateway.infer(query, "", task="fewshot", support=labelled[:1]), 422, "bad_support"),
            (lambda: gateway.infer(query, "", task="fewshot", support=labelled, support_set="farm"), 422, "bad_support"),
            (lambda: gateway.infer(query, "a cow", task="classify", support=labelled), 422, "bad_support"),
            (lambda: gateway.register_support_set("bad name!", labelled), 422, "bad_support"),
            (lambda: gateway.register_support_set("half", [*labelled, (b"junk", "dog")]), 400, "bad_magic"),
        ]
        for call, status, code in refusals:
            with pytest.raises(GatewayError) as info:
                call()
            assert (info.value.status, info.value.code) == (status, code), str(info.value)
        assert [s["name"] for s in gateway.support_sets()] == ["farm"]  # nothing half-registered
        # the edge CLI: encode the support photos, register, then ask by name
        env = {"PYTHONPATH": "shared:edge_client:cloud_server", "PATH": ""}
        edge = [sys.executable, "-m", "comneck_edge.cli"]
        run = subprocess.run([*edge, "support-set", "register", "pets", f"{photos[0]}=chicken", f"{photos[1]}=cow",
                              "--server", gateway.url], capture_output=True, text=True, env=env)
        assert run.returncode == 0 and "registered pets: 2 examples of chicken, cow (v2l)" in run.stdout, run.stderr
        run = subprocess.run([*edge, "encode", str(photos[1]), "--resize", "pad-square", "--server", gateway.url, "--support-set", "pets",
                              "--json"],
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["details"] == named["details"]
        assert gateway.delete_support_set("farm")["name"] == "farm"
        assert [s["name"] for s in gateway.support_sets()] == ["pets"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_in_each_dtype_matches_the_cpu(files, tiny_models, v2l, dtype):
    """float32 on CUDA decodes the CPU's tokens; the half types pick the same words (the codebook
    search runs in float32) and a class among the episode's."""
    backend = load(tiny_models, files.codebooks, llama=str(files.llama), device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(4)
    support_features, queries = torch.randn(4, v2l.codebook.width, generator=g), torch.randn(3, v2l.codebook.width, generator=g)
    support = [SupportExample(w, label) for w, label in zip(v2l.describe(support_features), LABELS)]
    on_cpu = v2l.fewshot(queries, support, [GenerationOptions()] * len(queries))
    on_gpu = backend.fewshot(queries.cuda().to(dtype), support, [GenerationOptions()] * len(queries))
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert gpu.details["words"] == cpu.details["words"]
        assert {e["label"] for e in gpu.details["labels"]} == {"cow", "dog"}
        if dtype == torch.float32:
            assert gpu.details["token_ids"] == cpu.details["token_ids"]
