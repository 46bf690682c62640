"""An :class:`~.base.LLMEngine` over a transformers causal LM and its own ``generate``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ..base import GenerationOptions
from .base import Generation, PromptEmbedder, answer_length, logprob_entries, runs

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


class HFEngine(PromptEmbedder):
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
    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

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
        self.check_prompts(embeds, options)
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
        lengths = [answer_length(seq, stops) for seq in sequences]
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
        return logprob_entries(self.tokenizer, [
            [(token, chosen[b][step], list(zip(top_ids[b][step], top_values[b][step])))
             for step, token in enumerate(sequences[b, :n].tolist())]
            for b, n in enumerate(lengths)
        ])
