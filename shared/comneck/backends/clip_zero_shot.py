"""A built-in backend that needs no LLM: CLIP zero-shot labelling over labels the prompt gives.

The prompt lists candidate labels, optionally after a question and a colon
("What is in the photo? Labels: cow, horse, beach"), or the request's ``choices`` are the
labels (the prompt is then only the question, which CLIP does not read). Each label is scored by CLIP's
zero-shot classifier (:mod:`comneck.zero_shot`) on the image embedding from the CLIP tail,
using the gateway's own CLIP text tower. With random CLIP weights the ranking is
meaningless, and the backend says so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import open_clip
import torch
from torch import nn

from ..errors import ComneckInputError, ErrorCode
from ..zero_shot import label_embeddings, zero_shot_logits
from .base import BackendAnswer, BackendContext, BackendSpec, GenerationOptions, ImageInfo

MAX_LABELS = 64
_CACHE_LIMIT = 4096  # text embeddings kept per backend; cleared when full


def parse_labels(prompt: str) -> list[str]:
    """Candidate labels of a prompt: the text after its last colon, split at commas, semicolons
    or new lines; duplicates dropped, order kept."""
    text = prompt.rsplit(":", 1)[-1]
    labels = list(dict.fromkeys(part.strip() for part in re.split(r"[,;\n]", text) if part.strip()))
    if len(labels) < 2:
        raise ComneckInputError(
            "the clip-zero-shot backend needs at least two candidate labels, e.g. 'Labels: cow, horse, beach'",
            ErrorCode.BAD_PROMPT,
        )
    if len(labels) > MAX_LABELS:
        raise ComneckInputError(f"at most {MAX_LABELS} candidate labels, got {len(labels)}", ErrorCode.BAD_PROMPT)
    return labels


class ClipZeroShot:
    """Scores the pooled CLIP image embedding against text embeddings of the candidate labels."""

    def __init__(self, spec: BackendSpec, clip_model: nn.Module, random_weights: bool) -> None:
        self.spec = spec
        self.clip = clip_model
        self.random_weights = random_weights
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip_model.context_length)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, context: BackendContext) -> "ClipZeroShot":
        """No weights of its own: the gateway's CLIP (random or not) does the work."""
        return cls(context.spec, context.clip_model, context.clip_random)

    def _label_embeddings(self, labels: list[str]) -> torch.Tensor:
        missing = [label for label in labels if label not in self._text_cache]
        if missing:
            if len(self._text_cache) + len(missing) > _CACHE_LIMIT:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, label_embeddings(self.clip, self.tokenizer, missing)))
        return torch.stack([self._text_cache[label] for label in labels])

    def check_prompt(self, prompt: str, task: str, options: GenerationOptions, choices: Sequence[str] = ()) -> None:
        if not choices:
            parse_labels(prompt)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, prompts: list[str], task: str, options: Sequence[GenerationOptions],
                 images: Sequence[ImageInfo] = (), choices: Sequence[Sequence[str]] = ()) -> list[BackendAnswer]:
        """``features``: pooled image embeddings [B, D]; each item has its own labels: its choices,
        else those its prompt lists, and its own ``top_k`` and ``logprobs`` (``images`` unused)."""
        answers = []
        for embedding, prompt, item, offered in zip(features, prompts, options, list(choices) or [()] * len(prompts)):
            labels = list(offered) or parse_labels(prompt)
            probs = zero_shot_logits(embedding[None], self._label_embeddings(labels), self.clip.logit_scale).softmax(dim=-1)[0]
            ranked = probs.argsort(descending=True)[: item.top_k].tolist()
            details: dict = {"labels": [{"label": labels[i], "probability": round(float(probs[i]), 6)} for i in ranked]}
            if item.logprobs:  # what applies of an LLM's logprobs: the label distribution, highest first
                logprobs = probs.log()
                details["logprobs"] = [{"label": labels[i], "logprob": float(logprobs[i])} for i in probs.argsort(descending=True)[: item.logprobs]]
            answers.append(BackendAnswer(text=labels[ranked[0]], details=details))
        return answers
