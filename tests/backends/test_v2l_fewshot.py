"""V2L few-shot parts: codebook files, words, prompt ids, the class mask and masked decoding,
against the official code's constructions written out here (the prompt: the official episode less
the labelled query it shows before asking, which a served request cannot know)."""

from __future__ import annotations

import os
import shlex

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


def test_the_vocabulary_loads_as_a_unicode_array_or_a_pickled_object_array_of_str(tmp_path):
    """The official reader's np.load(allow_pickle=True) reads both; so does ours, without np.load's pickle."""
    emb_file, voc_file, rows = codebook_files(tmp_path)
    np.save(tmp_path / "objects.npy", np.array(WORDS, dtype=object), allow_pickle=True)
    assert np.load(voc_file).dtype.kind == "U"
    for vocabulary in (voc_file, tmp_path / "objects.npy"):
        expected = tuple(np.load(vocabulary, allow_pickle=True).tolist())  # the official read, on trusted files
        codebook = Codebook.load(emb_file, vocabulary)
        assert codebook.words == expected == tuple(WORDS) and torch.equal(codebook.embeddings, rows)


class RunsAShell:
    """Pickles as a call of os.system: what a hostile .npy would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_vocabulary_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    emb_file, _, _ = codebook_files(tmp_path)
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.npy"
    np.save(hostile, np.array([*WORDS[:7], RunsAShell(f"touch {shlex.quote(str(marker))}")], dtype=object), allow_pickle=True)
    with pytest.raises(ComneckInputError) as info:
        Codebook.load(emb_file, hostile)
    message = str(info.value)
    assert info.value.code == "bad_weights" and str(hostile) in message and "system, which is no part of a NumPy array" in message
    assert "\n" not in message and not marker.exists()
    np.load(hostile, allow_pickle=True)  # the control: numpy's own unpickling runs it
    assert marker.exists()


def test_bad_codebook_files_are_refused_in_one_line(tmp_path):
    emb_file, voc_file, _ = codebook_files(tmp_path)
    np.save(tmp_path / "numbers.npy", np.arange(8))
    np.save(tmp_path / "not-str.npy", np.array([*WORDS[:7], 3], dtype=object), allow_pickle=True)
    np.save(tmp_path / "matrix.npy", np.array([WORDS[:4], WORDS[4:]]))
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    np.save(tmp_path / "short.npy", WORDS[:5])
    torch.save({"a": torch.zeros(2, 2), "b": torch.zeros(2)}, tmp_path / "two.pth")
    cases = [
        ((emb_file, tmp_path / "numbers.npy"), "holds a int64 array; expected strings"),
        ((emb_file, tmp_path / "not-str.npy"), "holds int 3 among the words; expected strings only"),
        ((emb_file, tmp_path / "matrix.npy"), "holds no 1-D array of the header's shape [2, 4]"),
        ((emb_file, tmp_path / "garbage.npy"), "refused: not a .npy array of strings"),
        ((emb_file, tmp_path / "short.npy"), "5 words for 8 codebook rows"),
        ((tmp_path / "two.pth", voc_file), "holds no [N, D] float tensor"),
    ]
    for files, message in cases:
        with pytest.raises(ComneckInputError) as info:
            Codebook.load(*files)
        assert info.value.code == "bad_weights" and message in str(info.value) and "\n" not in str(info.value), str(info.value)


def official_episode(sp, classes, examples, query) -> list[int]:
    """codec_V2L_fewshot.py (= eval_understanding.py) MiniImageNetDataset.__getitem__: BOS and the
    instruction, then every image of the CSV line, the query last, as ``###\\nInput: < `` words
    `` >\\nOutput: `` class, then the query's words once more, unlabelled; each piece its own encode."""
    text = "For each of the following input output pairs, output is one of "
    for c in classes:
        text += "['%s' or " % c
    ids = [sp.bos_id(), *sp.encode(text[:-4] + "]\n")]
    for words, label in examples:
        ids += sp.encode("###\nInput: < ") + sp.encode(words) + sp.encode(" >\nOutput: ") + sp.encode(label)
    return ids + sp.encode("###\nInput: < ") + sp.encode(query) + sp.encode(" >\nOutput: ")


def without_labelled_query(sp, episode: list[int], query: str, label: str) -> list[int]:
    """``episode`` less the query's labelled example, which the official episode shows right
    before the unlabelled query (checked to be there)."""
    unlabelled = sp.encode("###\nInput: < ") + sp.encode(query) + sp.encode(" >\nOutput: ")
    labelled = unlabelled + sp.encode(label)
    start = len(episode) - len(unlabelled) - len(labelled)
    assert episode[start : start + len(labelled)] == labelled
    return episode[:start] + episode[start + len(labelled) :]


def test_the_prompt_is_the_official_episode_without_its_labelled_query(tokenizer):
    sp = tokenizer.sp
    classes = classes_of(["dog", "cow", "dog"])
    assert classes == ["cow", "dog"]
    assert instruction(classes) == "For each of the following input output pairs, output is one of ['cow' or ['dog']\n"
    support = [("cowgrass", "cow"), ("dogsand", "dog")]
    ids = prompt_ids(tokenizer, classes, support, "cowsky")
    episode = official_episode(sp, classes, [*support, ("cowsky", "cow")], "cowsky")
    assert ids != episode and ids == without_labelled_query(sp, episode, "cowsky", "cow")


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
