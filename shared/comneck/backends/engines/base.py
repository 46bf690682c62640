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
from torch import nn

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


def answer_length(sequence: Sequence[int], stops: Sequence[int]) -> int:
    """How many tokens precede the first stop id (all of them when none stopped it)."""
    return next((j for j, token in enumerate(sequence) if token in stops), len(sequence))


def logprob_entries(tokenizer: Any, steps: list[list[tuple[int, float, list[tuple[int, float]]]]]) -> list[list[dict[str, Any]]]:
    """Per item, per generated token ``(id, logprob, [(id, logprob) of the best, highest first])``
    -> :class:`Generation`'s ``logprobs`` entries, each id's text decoded alone by ``tokenizer``."""
    ids = {i for item in steps for token, _, top in item for i in (token, *(t for t, _ in top))}
    text = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))
    return [
        [{"token": text[token], "token_id": token, "logprob": logprob,
          "top_logprobs": [{"token": text[i], "token_id": i, "logprob": v} for i, v in top]}
         for token, logprob, top in item]
        for item in steps
    ]


class PromptEmbedder:
    """Builds prompts in embedding space from an LM's input embedding table: what every engine
    offers its backend, whether it runs the LM here or sends the prompts elsewhere."""

    @property
    def input_embeddings(self) -> nn.Module:
        """The LM's input embedding table (``embed_tokens``)."""
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        """Width of the LM's input embeddings, which prompts must have."""
        return int(self.input_embeddings.weight.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the input embedding table (and so the prompt) lives."""
        return self.input_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The input embeddings' dtype, to which prompts are cast."""
        return self.input_embeddings.weight.dtype

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Rows of the LM's input embedding table for ``token_ids``: [T, hidden], for building prompts."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.input_embeddings(ids)

    def splice(self, token_ids: list[int], visual: torch.Tensor, start: int) -> torch.Tensor:
        """The prompt's input embeddings [T, hidden] with ``visual`` ([N, hidden]: the projected
        image tokens) written over rows ``start`` .. ``start + N``, the image placeholders' places."""
        embed = self.embed(token_ids).clone()
        embed[start : start + visual.shape[0]] = visual.to(embed.dtype)
        return embed

    def check_prompts(self, embeds: Sequence[torch.Tensor], options: Sequence[Any]) -> None:
        """Refuse (ValueError: a caller's bug) options not one per prompt, or a prompt not [T, hidden]."""
        if len(options) != len(embeds):
            raise ValueError(f"{len(embeds)} prompts but {len(options)} options: give one per prompt")
        for row, e in enumerate(embeds):
            if e.ndim != 2 or e.shape[1] != self.hidden_size:
                raise ValueError(f"prompt {row} has shape {tuple(e.shape)}; expected [T, {self.hidden_size}]")


class LLMEngine(Protocol):
    """Decodes a batch of prompts given as embeddings, and builds them (a :class:`PromptEmbedder`)."""

    def generate(
        self, embeds: list[torch.Tensor], options: Sequence[GenerationOptions], stop_ids: Sequence[int] = ()
    ) -> list[Generation]:
        """``embeds[i]`` is item i's whole prompt, [T_i, hidden] (lengths differ), decoded with
        ``options[i]`` -> one Generation per item, in order. Each item gets what it would get
        decoded alone (:func:`runs` says which items may share a decoding run).

        ``stop_ids`` end an answer (none given: the tokenizer's end-of-sequence token).
        """
        ...

    def splice(self, token_ids: list[int], visual: torch.Tensor, start: int) -> torch.Tensor:
        """A prompt's input embeddings [T, hidden] with ``visual`` over rows ``start`` .. ``start + N``
        (:class:`PromptEmbedder` builds them from the LM's input embedding table)."""
        ...
