"""HFEngine against a hand-written decoding loop on a tiny random Llama (no downloads).

The reference runs the model's full forward on each item's growing, unpadded sequence and
takes the argmax; the engine must match it through left padding, batching and transformers'
``generate`` with its KV cache.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from comneck.backends import GenerationOptions
from comneck.backends.engines import HFEngine, runs

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), 96)]
EOS = SPECIALS.index("</s>")
HIDDEN = 32


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed 96-token vocabulary, built in memory."""
    vocab = {token: i for i, token in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama() -> transformers.LlamaForCausalLM:
    """A 2-layer Llama whose every parameter (norm weights included) is random and non-zero.

    Scale 0.5, not smaller: at 0.2 the logits are nearly uniform (top-2 gaps of 0.003) and
    greedy decoding repeats one token, which would hide misaligned steps.
    """
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=3,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    assert all((p != 0).all() for p in model.parameters())
    return model


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine(tiny_llama(), tiny_tokenizer())


@pytest.fixture(scope="module")
def prompts(engine: HFEngine) -> list[torch.Tensor]:
    """Two prompts of different lengths, each text embeddings with 'visual' rows spliced in."""
    table = engine.model.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(1)
    visual = torch.randn(3, HIDDEN, generator=g)
    return [
        torch.cat([table[[1, 10, 11]], visual, table[[12, 13]]]),
        torch.cat([table[[1, 20]], visual[:2]]),
    ]


def reference(model: transformers.LlamaForCausalLM, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ids and the raw logits [steps, V] of each step, by full forwards on the unpadded sequence."""
    table = model.get_input_embeddings().weight.detach()
    seq, ids, logits = prompt, [], []
    with torch.no_grad():
        for _ in range(steps):
            step = model(inputs_embeds=seq[None]).logits[0, -1]
            ids.append(int(step.argmax()))
            logits.append(step)
            seq = torch.cat([seq, table[ids[-1]][None]])
    return ids, torch.stack(logits)


def test_greedy_batch_equals_reference_loop(engine, prompts):
    out = engine.generate(prompts, [GenerationOptions(max_new_tokens=8)] * 2, stop_ids=[95])
    for prompt, got in zip(prompts, out):
        ids, logits = reference(engine.model, prompt, 8)
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # argmax is not decided by rounding
        assert 95 not in ids and got.token_ids == ids and got.finish_reason == "length"
        assert got.text == " ".join(VOCAB[i] for i in ids) and got.logprobs is None


def test_batched_equals_one_at_a_time(engine, prompts):
    options = GenerationOptions(max_new_tokens=8)
    batched = engine.generate(prompts, [options] * 2)
    singles = [engine.generate([p], [options])[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in singles]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in singles]


def test_stop_id_ends_the_answer(engine, prompts):
    ids, _ = reference(engine.model, prompts[1], 6)
    assert len(set(ids[:3])) == 3 and EOS not in ids  # the stop first appears 3rd; </s> never comes
    steps = []
    handle = engine.model.lm_head.register_forward_hook(lambda *_: steps.append(1))
    try:
        stopped = engine.generate(prompts[1:], [GenerationOptions(max_new_tokens=6)], stop_ids=[ids[2]])[0]
    finally:
        handle.remove()
    assert stopped.token_ids == ids[:2] and stopped.finish_reason == "stop"
    assert len(steps) == 3  # decoding ended at the stop, not merely cut there
    unstopped = engine.generate(prompts[1:], [GenerationOptions(max_new_tokens=6)])[0]
    assert unstopped.token_ids == ids and unstopped.finish_reason == "length"


def test_eos_is_the_default_stop(engine, prompts):
    model = engine.model
    ids, _ = reference(model, prompts[1], 4)
    bias = torch.zeros(96)
    bias[EOS] = 1e4  # a hook on lm_head makes </s> the third token
    calls = []

    def third_step_eos(module, args, output):
        calls.append(1)
        return output + bias if len(calls) == 3 else output

    handle = model.lm_head.register_forward_hook(third_step_eos)
    try:
        out = engine.generate(prompts[1:], [GenerationOptions(max_new_tokens=4)])[0]
    finally:
        handle.remove()
    assert out.token_ids == ids[:2] and out.finish_reason == "stop"


def test_logprobs_are_raw_log_softmax(engine, prompts):
    out = engine.generate(prompts, [GenerationOptions(max_new_tokens=5, logprobs=3)] * 2)
    for prompt, got in zip(prompts, out):
        ids, logits = reference(engine.model, prompt, 5)
        expected = torch.log_softmax(logits, dim=-1)
        assert got.logprobs is not None and len(got.logprobs) == len(got.token_ids) == 5
        for step, entry in enumerate(got.logprobs):
            token = ids[step]
            assert entry["token_id"] == token and entry["token"] == VOCAB[token]
            assert entry["logprob"] == pytest.approx(float(expected[step, token]), abs=1e-4)
            best = expected[step].topk(3)
            tops = entry["top_logprobs"]
            assert [t["token_id"] for t in tops] == best.indices.tolist() and tops[0]["token_id"] == token
            assert [t["logprob"] for t in tops] == pytest.approx(best.values.tolist(), abs=1e-4)
            assert [t["token"] for t in tops] == [VOCAB[i] for i in best.indices.tolist()]


def test_sampling_is_seeded_and_leaves_global_rng_alone(engine, prompts):
    greedy = engine.generate(prompts, [GenerationOptions(max_new_tokens=8)] * 2)
    sampled = GenerationOptions(max_new_tokens=8, temperature=1.0, seed=7)
    state = torch.get_rng_state()
    first = engine.generate(prompts, [sampled] * 2)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # a different global state: the seed alone must decide the samples
    second = engine.generate(prompts, [sampled] * 2)
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert [g.token_ids for g in first] != [g.token_ids for g in greedy]  # it did sample
    nucleus = engine.generate(prompts, [GenerationOptions(max_new_tokens=8, temperature=1.0, top_p=1e-6)] * 2)
    assert [g.token_ids for g in nucleus] == [g.token_ids for g in greedy]


def test_runs_group_greedy_items_and_unseeded_samplers_alike_and_seeded_items_alone():
    options = [GenerationOptions(max_new_tokens=3, logprobs=2), GenerationOptions(temperature=0.5, seed=1),
               GenerationOptions(max_new_tokens=9, seed=4), GenerationOptions(temperature=0.5, top_p=0.9, max_new_tokens=2),
               GenerationOptions(temperature=0.5, top_p=0.9, logprobs=1), GenerationOptions(temperature=0.7),
               GenerationOptions(temperature=0.5, seed=1)]
    grouped = runs(options)
    assert [run.items for run in grouped] == [[0, 2], [1], [3, 4], [5], [6]]
    assert [(run.options.max_new_tokens, run.options.logprobs) for run in grouped] == [(9, 2), (64, 0), (64, 1), (64, 0), (64, 0)]
    assert [(run.options.temperature, run.options.top_p, run.options.seed) for run in grouped[1:3]] == [(0.5, 1.0, 1), (0.5, 0.9, None)]
    assert runs([]) == []


def test_mixed_options_give_each_item_what_it_gets_alone(engine, prompts, monkeypatch):
    ids, logits = reference(engine.model, prompts[0], 8)
    stop = ids[4]
    assert stop not in ids[:4]  # the stop comes 5th: right after item 0's limit, within item 2's
    options = [GenerationOptions(max_new_tokens=4, logprobs=2), GenerationOptions(max_new_tokens=8, logprobs=3),
               GenerationOptions(max_new_tokens=6), GenerationOptions(max_new_tokens=5, temperature=1.0, seed=7)]
    batch = [prompts[0], prompts[1], prompts[0], prompts[1]]
    calls = []
    generate = engine.model.generate
    monkeypatch.setattr(engine.model, "generate", lambda **kw: calls.append(kw["max_new_tokens"]) or generate(**kw))
    out = engine.generate(batch, options, stop_ids=[stop])
    assert calls == [8, 5]  # the three greedy items in one run as long as the longest; the seeded one alone
    singles = [engine.generate([p], [o], stop_ids=[stop])[0] for p, o in zip(batch, options)]
    for got, alone in zip(out, singles):
        assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
        assert (got.logprobs is None) == (alone.logprobs is None)
        for a, b in zip(got.logprobs or [], alone.logprobs or []):
            assert (a["token_id"], [t["token_id"] for t in a["top_logprobs"]]) == (b["token_id"], [t["token_id"] for t in b["top_logprobs"]])
            assert [a["logprob"]] + [t["logprob"] for t in a["top_logprobs"]] == pytest.approx(
                [b["logprob"]] + [t["logprob"] for t in b["top_logprobs"]], abs=1e-4)
    # against the reference loop: cut to each item's own length, ended by the stop only within it
    assert (out[0].token_ids, out[0].finish_reason) == (ids[:4], "length")
    assert (out[2].token_ids, out[2].finish_reason, out[2].logprobs) == (ids[:4], "stop", None)
    expected = torch.log_softmax(logits, dim=-1)
    assert [[t["token_id"] for t in e["top_logprobs"]] for e in out[0].logprobs] == expected[:4].topk(2).indices.tolist()
    torch.testing.assert_close(torch.tensor([[t["logprob"] for t in e["top_logprobs"]] for e in out[0].logprobs]),
                               expected[:4].topk(2).values, atol=1e-4, rtol=0)
    ids1, logits1 = reference(engine.model, prompts[1], 8)
    n = ids1.index(stop) if stop in ids1 else 8
    assert (out[1].token_ids, out[1].finish_reason) == (ids1[:n], "stop" if n < 8 else "length")
    assert [[t["token_id"] for t in e["top_logprobs"]] for e in out[1].logprobs] == torch.log_softmax(logits1[:n], -1).topk(3).indices.tolist()
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(batch, options[:2])


def test_embed_reads_the_input_embedding_table(engine):
    table = engine.model.get_input_embeddings().weight
    assert torch.equal(engine.embed([5, 1, 5, 90]), table[[5, 1, 5, 90]])
    assert engine.hidden_size == HIDDEN and engine.dtype == torch.float32 and engine.device == torch.device("cpu")
