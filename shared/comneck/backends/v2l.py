"""V2L-Tokenizer few-shot classification (zh460045050/V2L-Tokenizer @ 80e50ac3) as a backend.

Each image (support and query) becomes words: its pooled CLIP embedding (``ln_post(CLS) @ proj``,
the official global branch; the Bridging copy applies ``ln_post`` twice, which this does not) picks
the 21 nearest entries of V2L's global codebook (:mod:`.v2l_fewshot`). The support's words and
labels and the query's words make the official few-shot prompt, less the labelled copy of the
query the official episode shows (its label is what is asked), for LLaMA-2-7B (Meta's format,
:mod:`.meta_checkpoint`), which decodes 16 greedy steps under the class-name mask; the answer is
the class the decoded text starts with. Support images are described once per request, or once
when a support set is registered.

Weights: V2L's ``codebooks`` folder (``global_codebook_embedding.pth``, ``global_vocabulary.npy``)
as ``--backend v2l=CODEBOOKS,llama=LLAMA2_7B`` (Meta's ``params.json``, ``consolidated.00.pth``,
``tokenizer.model``). V2L's own ``v2l-decode.pth`` (its VQ model) is optional: given as
``checkpoint=PATH``, the global codebook it holds replaces the codebook file's rows, as the
official loader's ``load_state_dict(strict=False)`` lets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ComneckInputError, ErrorCode
from .base import BackendAnswer, BackendContext, BackendSpec, GenerationOptions, ImageInfo, SupportExample
from .engines import check_context
from .hf_checkpoint import llama_from_tensors
from .meta_checkpoint import MetaLlama
from .sp_tokenizer import SentencePieceTokenizer
from .v2l_fewshot import (DEFAULT_WORDS, STEPS, Codebook, PromptState, class_logprobs, class_mask, classes_of, masked_greedy, predicted_class,
                          prompt_ids)

CODEBOOK_FILES = ("global_codebook_embedding.pth", "global_vocabulary.npy")


class V2L:
    """A loaded V2L: the global codebook, LLaMA-2 and its tokenizer."""

    random_weights = False  # it loads published weights only

    def __init__(self, spec: BackendSpec, model: torch.nn.Module, tokenizer: SentencePieceTokenizer, codebook: Codebook,
                 context_length: int, words: int = DEFAULT_WORDS) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.codebook = codebook
        self.context_length = context_length
        self.words = words

    @classmethod
    def load(cls, context: BackendContext) -> "V2L":
        """The codebook folder (``context.weights``), the LLaMA-2 folder (option ``llama``) and, if
        given, ``v2l-decode.pth`` (option ``checkpoint``), whose codebook then takes precedence."""
        if context.weights is None or "llama" not in context.options:
            raise ComneckInputError("v2l needs V2L's codebooks folder and LLaMA-2-7B in Meta's format: "
                                    "--backend v2l=CODEBOOKS,llama=LLAMA2_FOLDER", ErrorCode.BAD_SETTINGS)
        folder = Path(context.weights)
        codebook = Codebook.load(*(folder / name for name in CODEBOOK_FILES))
        if len(codebook.words) < DEFAULT_WORDS:
            raise ComneckInputError(f"V2L codebook: {folder}: {len(codebook.words)} rows, fewer than the {DEFAULT_WORDS} words "
                                    "each image takes", ErrorCode.BAD_WEIGHTS)
        width = int(context.clip_model.visual.output_dim)
        if codebook.width != width:
            raise ComneckInputError(f"V2L codebook: {folder}: rows of width {codebook.width}; this gateway's CLIP embeds in "
                                    f"{width} ({context.clip_config.name})", ErrorCode.BAD_WEIGHTS)
        if "checkpoint" in context.options:
            codebook = codebook.with_checkpoint(context.options["checkpoint"])
        llama = MetaLlama.read(context.options["llama"], clean_up=False)  # decoded as Meta's Tokenizer.decode does
        model = llama_from_tensors(llama.config(), llama.tensors(), llama.folder, context.dtype, context.device)
        return cls(context.spec, model, llama.tokenizer, codebook, int(model.config.max_position_embeddings))

    def check_prompt(self, prompt: str, task: str, options: GenerationOptions, choices: Sequence[str] = ()) -> None:
        """The prompt is V2L's own, built from the support's labels: a request's text would be ignored, so it is refused."""
        if prompt.strip():
            raise ComneckInputError("v2l builds its prompt from the support's labels: send an empty prompt", ErrorCode.BAD_PROMPT)

    def check_support(self, labels: Sequence[str]) -> None:
        """Every class name must fit the 16 decoding steps with its EOS (``bad_support``)."""
        class_mask(self.tokenizer, classes_of(labels), self.tokenizer.vocab_size)

    @torch.inference_mode()
    def describe(self, features: torch.Tensor) -> list[str]:
        """Pooled CLIP embeddings [N, D] -> each image's codebook words."""
        return self.codebook.describe(features, self.words)

    def generate(self, features: torch.Tensor, prompts: list[str], task: str, options: Sequence[GenerationOptions],
                 images: Sequence[ImageInfo] = (), choices: Sequence[Sequence[str]] = ()) -> list[BackendAnswer]:
        """V2L answers only with support (task ``fewshot``, :meth:`fewshot`); the pipeline routes there."""
        raise ComneckInputError("v2l classifies among labelled support examples only: task fewshot", ErrorCode.UNSUPPORTED_TASK)

    @torch.inference_mode()
    def fewshot(self, features: torch.Tensor, support: Sequence[SupportExample],
                options: Sequence[GenerationOptions]) -> list[BackendAnswer]:
        """Query embeddings [B, D] -> the class of each, in the episode the support makes (batch 1
        per query, as the official loop decodes). Every query decodes the official way (16
        masked greedy steps), whatever its ``options`` (one per query) ask of the sampler."""
        classes = classes_of([e.label for e in support])
        mask = class_mask(self.tokenizer, classes, self.tokenizer.vocab_size)
        table = self.model.get_input_embeddings()
        answers = []
        for words, item in zip(self.describe(features), options):
            ids = prompt_ids(self.tokenizer, classes, [(e.description, e.label) for e in support], words)
            check_context("v2l", len(ids), item.model_copy(update={"max_new_tokens": STEPS}), self.context_length)
            embeds = table(torch.tensor(ids, device=table.weight.device))
            state = PromptState(self.model, embeds)  # the prompt read once, for the decoding and the scores
            tokens = masked_greedy(state, mask)
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            found = predicted_class(text, classes)
            scores = class_logprobs(state, self.tokenizer, classes)
            probabilities = torch.softmax(torch.tensor(list(scores.values()), dtype=torch.float64), 0).tolist()
            ranked = sorted(zip(scores, scores.values(), probabilities), key=lambda item: -item[1])
            details = {
                "class": found, "generated": text, "words": words, "prompt_token_ids": ids, "token_ids": tokens,
                "labels": [{"label": label, "logprob": logprob, "probability": round(p, 6)} for label, logprob, p in ranked],
            }
            if found is None:
                details["class_note"] = "the decoded text starts with no class name (the official scorer counts it wrong)"
            answers.append(BackendAnswer(found if found is not None else text.strip(), details))
        return answers
