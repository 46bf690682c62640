"""The boundary between a backend and the language model that writes its answers.

A backend builds each prompt in embedding space (text embeddings with its visual tokens
spliced in) and hands the batch to an :class:`LLMEngine`, which decodes it. Engines differ
in how they run the model (plain transformers, a serving runtime, ...), not in what they
return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from ...errors import ComneckInputError, ErrorCode
from ..base import GenerationOptions

FinishReason = Literal["stop", "length"]


@dataclass
class Generation:
    """One item's decoded answer.

    * ``token_ids``: the generated ids, the stop token that ended them excluded.
    * ``text``: ``token_ids`` decoded, special tokens skipped.
    * ``finish_reason``: ``stop`` when a stop id ended the answer, ``length`` when it ran
      to ``max_new_tokens``.
    * ``logprobs``: with ``options.logprobs = k > 0``, one entry per id in ``token_ids``,
      as OpenAI and vLLM report them: ``{"token", "token_id", "logprob", "top_logprobs":
      [k of {"token", "token_id", "logprob"}, highest first]}``; None when not asked.
    """

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[dict[str, Any]] | None = None

    def details(self, prompt_ids: list[int]) -> dict[str, Any]:
        """What an LLM backend's answer reports (``BackendAnswer.details``): the prompt's ids,
        the generated ids, the finish reason and, when asked, the log-probabilities."""
        details: dict[str, Any] = {"prompt_token_ids": prompt_ids, "token_ids": self.token_ids, "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            details["logprobs"] = self.logprobs
        return details


@dataclass(frozen=True)
class Run:
    """Items of a batch that may decode in one ``model.generate`` call, and the options of that
    call: the largest ``max_new_tokens`` and ``logprobs`` of its items (each item's answer is
    then cut to its own)."""

    items: list[int]
    options: GenerationOptions


def runs(options: Sequence[GenerationOptions]) -> list[Run]:
    """Group a batch's per-item options into decoding runs that give each item what it would get
    alone: greedy items (temperature 0) share one run; a seeded sampled item runs alone (its seed
    then draws exactly what a single call draws); unseeded sampled items share a run when their
    temperature and top-p are equal. Runs come in the order of their first items."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, item in enumerate(options):
        key = ("greedy",) if item.temperature == 0 else ("seeded", i) if item.seed is not None else ("sampled", item.temperature, item.top_p)
        groups.setdefault(key, []).append(i)
    return [
        Run(items, options[items[0]].model_copy(update={
            "max_new_tokens": max(options[i].max_new_tokens for i in items), "logprobs": max(options[i].logprobs for i in items)}))
        for items in groups.values()
    ]


def check_context(backend: str, prompt_tokens: int, options: GenerationOptions, context_length: int) -> None:
    """Refuse (``prompt_too_long``) a prompt whose tokens and longest answer overrun the LLM's context."""
    if prompt_tokens + options.max_new_tokens > context_length:
        raise ComneckInputError(
            f"the prompt takes {prompt_tokens} tokens and the answer up to {options.max_new_tokens}: more than {backend}'s "
            f"context of {context_length}", ErrorCode.PROMPT_TOO_LONG)


class LLMEngine(Protocol):
    """Decodes a batch of prompts given as embeddings."""

    def generate(
        self, embeds: list[torch.Tensor], options: Sequence[GenerationOptions], stop_ids: Sequence[int] = ()
    ) -> list[Generation]:
        """``embeds[i]`` is item i's whole prompt, [T_i, hidden] (lengths differ), decoded with
        ``options[i]`` -> one Generation per item, in order. Each item gets what it would get
        decoded alone (:func:`runs` says which items may share a decoding run).

        ``stop_ids`` end an answer (none given: the tokenizer's end-of-sequence token).
        """
        ...
