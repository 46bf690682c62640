"""A built-in backend that needs no LLM: CLIP zero-shot labelling over labels the prompt gives.

The prompt lists candidate labels, optionally after a question and a colon
("What is in the photo? Labels: cow, horse, beach"). Each label becomes "a photo of a
{label}." and is embedded by CLIP's own text tower; the image embedding from the CLIP
tail is scored against them with CLIP's logit scale, as in CLIP's zero-shot evaluation.
With random CLIP weights the ranking is meaningless, and the backend says so.
"""

from __future__ import annotations

import re

import open_clip
import torch
from torch import nn

from ..errors import ComneckInputError
from .base import BackendAnswer, ClipTap, GenerationOptions

TEMPLATE = "a photo of a {}."
MAX_LABELS = 64
_CACHE_LIMIT = 4096  # text embeddings kept per backend; cleared when full


def label_embeddings(clip: nn.Module, tokenizer: open_clip.tokenizer.SimpleTokenizer, labels: list[str], chunk: int = 256) -> torch.Tensor:
    """L2-normalised CLIP text embeddings [len(labels), D] (float32) of "a photo of a {label}."."""
    device = next(clip.parameters()).device
    with torch.no_grad():
        return torch.cat([
            clip.encode_text(tokenizer([TEMPLATE.format(label) for label in labels[i : i + chunk]]).to(device), normalize=True).float()
            for i in range(0, len(labels), chunk)
        ])


def parse_labels(prompt: str) -> list[str]:
    """Candidate labels of a prompt: the text after its last colon, split at commas, semicolons
    or new lines; duplicates dropped, order kept."""
    text = prompt.rsplit(":", 1)[-1]
    labels = list(dict.fromkeys(part.strip() for part in re.split(r"[,;\n]", text) if part.strip()))
    if len(labels) < 2:
        raise ComneckInputError(
            "the clip-zero-shot backend needs at least two candidate labels, e.g. 'Labels: cow, horse, beach'",
            "bad_prompt",
        )
    if len(labels) > MAX_LABELS:
        raise ComneckInputError(f"at most {MAX_LABELS} candidate labels, got {len(labels)}", "bad_prompt")
    return labels


class ClipZeroShot:
    """Scores the pooled CLIP image embedding against text embeddings of the candidate labels."""

    name = "clip-zero-shot"
    description = "CLIP zero-shot labeller: ranks the candidate labels listed in the prompt"
    tasks = ("classify",)
    tap = ClipTap("embedding", tokens="cls")

    def __init__(self, clip_model: nn.Module, random_weights: bool) -> None:
        self.clip = clip_model
        self.random_weights = random_weights
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip_model.context_length)
        self._text_cache: dict[str, torch.Tensor] = {}

    def _label_embeddings(self, labels: list[str]) -> torch.Tensor:
        missing = [label for label in labels if label not in self._text_cache]
        if missing:
            if len(self._text_cache) + len(missing) > _CACHE_LIMIT:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, label_embeddings(self.clip, self.tokenizer, missing)))
        return torch.stack([self._text_cache[label] for label in labels])

    @torch.inference_mode()
    def answer(self, features: torch.Tensor, prompt: str, task: str, options: GenerationOptions) -> BackendAnswer:
        labels = parse_labels(prompt)
        image = nn.functional.normalize(features.float(), dim=-1)  # [1, D]
        logits = self.clip.logit_scale.exp().float() * image @ self._label_embeddings(labels).T
        probs = logits.softmax(dim=-1)[0]
        ranked = probs.argsort(descending=True)[: options.top_k].tolist()
        return BackendAnswer(
            text=labels[ranked[0]],
            details={"labels": [{"label": labels[i], "probability": round(float(probs[i]), 6)} for i in ranked]},
        )
