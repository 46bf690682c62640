"""An :class:`~.base.LLMEngine` over a transformers causal LM and its own ``generate``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ..base import GenerationOptions
from .base import Generation, runs

if TYPE_CHECKING:  # transformers is needed only by whoever builds the model and tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the body on torch RNG seeded with ``seed`` (CPU and a CUDA ``device``), restoring it after.

    None leaves the RNG alone. The same seed gives the same samples, and the caller's
    random state is untouched either way.
    """
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class HFEngine:
    """Decodes prompt embeddings with a transformers ``PreTrainedModel`` (a causal LM).

    Prompts are left-padded with zero vectors (attention mask 0 there) into batches (one per
    :func:`~.base.runs` group) and decoded by ``model.generate``. Each item's
    ``GenerationOptions`` fully decide its sampling: the temperature and top-p it gives, no
    top-k (the model's own ``generation_config`` may set one; ``options.top_k`` is a
    classifier's ranked-answers count, not a sampler).
    The model is put in eval mode.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @property
    def hidden_size(self) -> int:
        """Width of the LM's input embeddings, which prompts must have."""
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the input embedding table (and so the prompt) lives."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The input embeddings' dtype, to which prompts are cast."""
        return self.model.get_input_embeddings().weight.dtype

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Rows of the LM's input embedding table for ``token_ids``: [T, hidden], for building prompts."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.model.get_input_embeddings()(ids)

    def splice(self, token_ids: list[int], visual: torch.Tensor, start: int) -> torch.Tensor:
        """The prompt's input embeddings [T, hidden] with ``visual`` ([N, hidden]: the projected
        image tokens) written over rows ``start`` .. ``start + N``, the image placeholders' places."""
        embed = self.embed(token_ids).clone()
        embed[start : start + visual.shape[0]] = visual.to(embed.dtype)
        return embed

    def generate(
        self, embeds: list[torch.Tensor], options: Sequence[GenerationOptions], stop_ids: Sequence[int] = ()
    ) -> list[Generation]:
        """Decode each ``embeds[i]`` ([T_i, hidden]) with ``options[i]``, in left-padded batches
        of the items :func:`~.base.runs` lets decode together.

        ``stop_ids`` end an answer (none given: the tokenizer's end-of-sequence token, else
        the model's). With ``options[i].logprobs = k``, each generated token's log-probability
        and the k most likely alternatives come from log-softmax of the model's raw logits
        at that step, before temperature or top-p reshape them.
        """
        if len(options) != len(embeds):
            raise ValueError(f"{len(embeds)} prompts but {len(options)} options: give one per prompt")
        stops = list(stop_ids) or self._default_stops()
        answers: dict[int, Generation] = {}
        for run in runs(options):
            items = [options[i] for i in run.items]
            answers.update(zip(run.items, self._run([embeds[i] for i in run.items], run.options, items, stops)))
        return [answers[i] for i in range(len(embeds))]

    def _run(self, embeds: list[torch.Tensor], run: GenerationOptions, items: list[GenerationOptions],
             stops: list[int]) -> list[Generation]:
        """One ``model.generate`` call over ``embeds`` with the ``run`` options (the largest length
        and logprobs count of ``items``), each answer then cut to its item's own limits: ended
        by the first stop id within its ``max_new_tokens`` (``stop``), else by that length
        (``length``), with its ``logprobs`` best alternatives (none for 0)."""
        inputs, mask = self._left_pad(embeds)
        kwargs: dict[str, Any] = {
            "max_new_tokens": run.max_new_tokens,
            "do_sample": run.temperature > 0,
            "eos_token_id": stops or None,
            "pad_token_id": self._pad_id(stops),
            "return_dict_in_generate": True,
            "output_logits": run.logprobs > 0,
        }
        if run.temperature > 0:  # set only when sampling: greedy decoding warns about them
            kwargs.update(temperature=run.temperature, top_p=run.top_p, top_k=0)
        with _seeded(run.seed, self.device), torch.inference_mode():
            out = self.model.generate(inputs_embeds=inputs, attention_mask=mask, **kwargs)
        # Given embeddings and no ids, decoder-only generate returns only the new tokens.
        sequences = [seq[: item.max_new_tokens] for seq, item in zip(out.sequences.tolist(), items)]
        lengths = [_answer_length(seq, set(stops)) for seq in sequences]
        logprobs = self._logprobs(out.logits, out.sequences, lengths, run.logprobs) if run.logprobs else None
        return [
            Generation(
                token_ids=seq[:n],
                text=self.tokenizer.decode(seq[:n], skip_special_tokens=True),
                finish_reason="stop" if n < len(seq) else "length",
                logprobs=[{**entry, "top_logprobs": entry["top_logprobs"][: item.logprobs]} for entry in logprobs[b]]
                if logprobs is not None and item.logprobs else None,
            )
            for b, (seq, n, item) in enumerate(zip(sequences, lengths, items))
        ]

    def _default_stops(self) -> list[int]:
        """The tokenizer's end-of-sequence id, else the model's generation config's (an int or a list)."""
        if self.tokenizer.eos_token_id is not None:
            return [self.tokenizer.eos_token_id]
        eos = self.model.generation_config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def _pad_id(self, stops: list[int]) -> int:
        """The id filling finished rows: the tokenizer's pad, else a stop id (cut off either way)."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return stops[0] if stops else 0

    def _left_pad(self, embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts [T_i, hidden] -> a zero-left-padded batch [B, T, hidden] and its attention mask [B, T]."""
        longest = max(e.shape[0] for e in embeds)
        inputs = torch.zeros(len(embeds), longest, self.hidden_size, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=self.device)
        for row, e in enumerate(embeds):
            if e.ndim != 2 or e.shape[1] != self.hidden_size:
                raise ValueError(f"prompt {row} has shape {tuple(e.shape)}; expected [T, {self.hidden_size}]")
            inputs[row, longest - e.shape[0] :] = e.to(self.device, self.dtype)
            mask[row, longest - e.shape[0] :] = 1
        return inputs, mask

    def _logprobs(
        self, logits: tuple[torch.Tensor, ...], sequences: torch.Tensor, lengths: list[int], k: int
    ) -> list[list[dict[str, Any]]]:
        """Per item, per kept token: its log-probability and the k best, from the raw step logits ([B, V] each)."""
        logp = torch.log_softmax(torch.stack(logits, dim=1).float(), dim=-1)  # [B, N, V]
        chosen = logp.gather(-1, sequences[:, : logp.shape[1]].unsqueeze(-1)).squeeze(-1).tolist()
        top_values, top_ids = (t.tolist() for t in logp.topk(k, dim=-1))
        ids = {i for seq, n in zip(sequences.tolist(), lengths) for i in seq[:n]}
        ids.update(i for b, n in enumerate(lengths) for step in top_ids[b][:n] for i in step)
        text = dict(zip(ids, self.tokenizer.batch_decode([[i] for i in ids])))
        return [
            [
                {
                    "token": text[token],
                    "token_id": token,
                    "logprob": chosen[b][step],
                    "top_logprobs": [
                        {"token": text[i], "token_id": i, "logprob": v}
                        for i, v in zip(top_ids[b][step], top_values[b][step])
                    ],
                }
                for step, token in enumerate(sequences[b, :n].tolist())
            ]
            for b, n in enumerate(lengths)
        ]


def _answer_length(sequence: list[int], stops: set[int]) -> int:
    """How many tokens precede the first stop id (all of them when none stopped it)."""
    return next((j for j, token in enumerate(sequence) if token in stops), len(sequence))
