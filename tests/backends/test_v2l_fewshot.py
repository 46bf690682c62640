"""V2L few-shot parts: codebook files, words, prompt ids, the class mask and masked decoding,
against the official construction written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from checkpoints import HEADS, HIDDEN, INTERMEDIATE, LAYERS, llama_state, random_nonzero, train_tokenizer

from comneck.backends.sp_tokenizer import SentencePieceTokenizer
from comneck.backends.v2l_fewshot import (STEPS, Codebook, PromptState, class_logprobs, class_mask, classes_of, instruction, masked_greedy,
                                          predicted_class, prompt_ids)
from comneck.errors import ComneckInputError

WORDS = ["cow", "grass", "sky", "beach", "dog", "red", "sand", "tree"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("v2l") / "tokenizer.model"
    train_tokenizer(path, extra=("For each of the following input output pairs, output is one of ['cow' or ['dog']",
                                 "###\nInput: < cowgrasssky >\nOutput: great_white_shark", *WORDS))
    return SentencePieceTokenizer(path)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=512)
    llama = transformers.LlamaForCausalLM(config).eval()
    llama.load_state_dict(llama_state(tokenizer.vocab_size, torch.Generator().manual_seed(0)))
    return llama


def codebook_files(tmp_path, rows=8, width=12):
    g = torch.Generator().manual_seed(1)
    embeddings = random_nonzero((rows, width), g)
    torch.save(embeddings, tmp_path / "global_codebook_embedding.pth")
    np.save(tmp_path / "global_vocabulary.npy", WORDS[:rows])  # a list of str, as step1 saves it
    return tmp_path / "global_codebook_embedding.pth", tmp_path / "global_vocabulary.npy", embeddings


def test_codebook_words_are_the_nearest_rows_by_the_official_distance(tmp_path):
    emb_file, voc_file, rows = codebook_files(tmp_path)
    codebook = Codebook.load(emb_file, voc_file)
    images = torch.randn(3, 12, generator=torch.Generator().manual_seed(2)) * 5
    g = images / images.norm(dim=-1, keepdim=True)
    for image, words, nearest in zip(g, codebook.describe(images, k=3), codebook.nearest(images, 3).tolist()):
        distance = [float(((image - row) ** 2).sum()) for row in rows]  # ||g - e||², the same ranking
        order = sorted(range(len(rows)), key=distance.__getitem__)[:3]
        assert nearest == order and words == "".join(WORDS[i] for i in order)


def test_bad_codebook_files_are_refused_in_one_line(tmp_path):
    emb_file, voc_file, _ = codebook_files(tmp_path)
    np.save(tmp_path / "pickled.npy", np.array(WORDS, dtype=object), allow_pickle=True)
    np.save(tmp_path / "short.npy", WORDS[:5])
    torch.save({"a": torch.zeros(2, 2), "b": torch.zeros(2)}, tmp_path / "two.pth")
    cases = [
        ((emb_file, tmp_path / "pickled.npy"), "pickled object array"),
        ((emb_file, tmp_path / "short.npy"), "5 words for 8 codebook rows"),
        ((tmp_path / "two.pth", voc_file), "holds no [N, D] float tensor"),
    ]
    for files, message in cases:
        with pytest.raises(ComneckInputError) as info:
            Codebook.load(*files)
        assert info.value.code == "bad_weights" and message in str(info.value) and "\n" not in str(info.value)


def test_the_prompt_is_the_official_episode(tokenizer):
    sp = tokenizer.sp
    classes = classes_of(["dog", "cow", "dog"])
    assert classes == ["cow", "dog"]
    assert instruction(classes) == "For each of the following input output pairs, output is one of ['cow' or ['dog']\n"
    ids = prompt_ids(tokenizer, classes, [("cowgrass", "cow"), ("dogsand", "dog")], "cowsky")
    expected = [1, *sp.encode(instruction(classes))]
    for words, label in [("cowgrass", "cow"), ("dogsand", "dog")]:
        expected += sp.encode("###\nInput: < ") + sp.encode(words) + sp.encode(" >\nOutput: ") + sp.encode(label)
    expected += sp.encode("###\nInput: < ") + sp.encode("cowsky") + sp.encode(" >\nOutput: ")
    assert ids == expected


def test_the_mask_is_the_per_position_union_of_class_tokens(tokenizer):
    mask = class_mask(tokenizer, ["cow", "great_white_shark"], tokenizer.vocab_size)
    cow, shark = (tokenizer.sp.encode(c) + [2] for c in ("cow", "great_white_shark"))
    assert mask.shape == (STEPS, tokenizer.vocab_size)
    for j in range(STEPS):
        allowed = {t[j] for t in (cow, shark) if j < len(t)}
        assert set(mask[j].nonzero().flatten().tolist()) == allowed
    with pytest.raises(ComneckInputError) as info:
        class_mask(tokenizer, ["x" * 40], tokenizer.vocab_size)
    assert info.value.code == "bad_support" and "V2L decodes 16" in str(info.value)


@pytest.mark.parametrize("text, classes, expected", [
    ("cow ⁇  ⁇ ", ["cow", "dog"], "cow"), ("dog", ["cow", "dog"], "dog"), ("cat", ["cow", "dog"], None),
    ("great_white_shark", ["great", "great_white_shark"], "great_white_shark"), (" cow", ["cow"], None),
])
def test_the_class_is_read_by_prefix_as_the_official_scorer_reads_it(text, classes, expected):
    assert predicted_class(text, classes) == expected


def test_masked_greedy_equals_a_full_forward_each_step(tokenizer, model):
    classes = ["cow", "dog"]
    ids = prompt_ids(tokenizer, classes, [("cowgrass", "cow"), ("dogsand", "dog")], "cowsky")
    embeds = model.get_input_embeddings()(torch.tensor(ids)).detach()
    mask = class_mask(tokenizer, classes, tokenizer.vocab_size)
    reference, sequence = [], embeds
    with torch.no_grad():
        for row in mask:  # softmax * mask, argmax: written out as the official loop does it
            probs = torch.softmax(model(inputs_embeds=sequence[None]).logits[0, -1], -1) * row
            token = int(probs.argmax())
            reference.append(token)
            sequence = torch.cat([sequence, model.get_input_embeddings()(torch.tensor([token]))])
    read = []  # how many positions each forward call runs
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: read.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        state = PromptState(model, embeds)
        scores = class_logprobs(state, tokenizer, classes)  # before the decoding: neither changes the prompt's cache
        out = masked_greedy(state, mask)
    finally:
        hook.remove()
    assert out == reference and len(out) == STEPS
    assert out[0] in {tokenizer.sp.encode(c)[0] for c in classes}
    # the prompt is read once; each class then runs its own tokens, the decoding its 15 fed-back ones
    assert read == [len(ids), *(len(tokenizer.sp.encode(c)) for c in classes), *[1] * (STEPS - 1)]
    with torch.no_grad():
        for label, score in scores.items():
            tokens = tokenizer.sp.encode(label) + [2]
            seq = torch.cat([embeds, model.get_input_embeddings()(torch.tensor(tokens[:-1]))])
            logp = torch.log_softmax(model(inputs_embeds=seq[None]).logits[0], -1)
            expected = sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(tokens))
            assert score == pytest.approx(expected, abs=1e-5)
