"""Reference computations and checks the LLM backends' tests share, written with transformers' models only."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from comneck.backends import BackendAnswer, GenerationOptions

#: One batch's per-item options as an evaluation mixes them: greedy items of different lengths and
#: logprobs counts, and a seeded sampled item beside them.
MIXED_OPTIONS = [GenerationOptions(max_new_tokens=3, logprobs=2), GenerationOptions(max_new_tokens=6),
                 GenerationOptions(max_new_tokens=5, temperature=1.0, seed=11, logprobs=3)]


def greedy(model, embeds: torch.Tensor, steps: int, eos: int) -> list[int]:
    """Full forward on the growing, unpadded sequence each step; argmax."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([token]))])
    return out


def assert_batch_equals_singles(answer: Callable[[slice], list[BackendAnswer]], size: int) -> list[BackendAnswer]:
    """``answer(items)`` answers the batch's ``items`` (a slice of its features, prompts and per-item
    options). The whole batch must answer each item as a call with that item alone does: the same
    text and details (token ids, finish reason, ...), and log-probabilities equal to float
    tolerance, 1e-4 (the batch is left-padded: float32 sums over other lengths, which moved a
    log-probability by more than 1e-5 on a CI run). Returns the batch's answers."""
    batch = answer(slice(None))
    assert len(batch) == size
    for i, got in enumerate(batch):
        (alone,) = answer(slice(i, i + 1))
        strip = {k: v for k, v in got.details.items() if k != "logprobs"}
        assert (got.text, strip) == (alone.text, {k: v for k, v in alone.details.items() if k != "logprobs"})
        ours, theirs = got.details.get("logprobs"), alone.details.get("logprobs")
        assert (ours is None) == (theirs is None) and len(ours or []) == len(theirs or [])
        for a, b in zip(ours or [], theirs or []):
            assert [a["token_id"], *(t["token_id"] for t in a["top_logprobs"])] == [b["token_id"], *(t["token_id"] for t in b["top_logprobs"])]
            assert [a["logprob"], *(t["logprob"] for t in a["top_logprobs"])] == pytest.approx(
                [b["logprob"], *(t["logprob"] for t in b["top_logprobs"])], abs=1e-4)
    return batch
