"""CLIP's zero-shot classifier, in one place for the labelling backend and the training CE head.

A label becomes "a photo of a {label}." embedded by CLIP's text tower; an image embedding
is scored against the labels with CLIP's logit scale times the cosine similarity, as in
CLIP's zero-shot evaluation.
"""

from __future__ import annotations

import open_clip
import torch
from torch import nn

TEMPLATE = "a photo of a {}."


def label_embeddings(clip: nn.Module, tokenizer: open_clip.tokenizer.SimpleTokenizer, labels: list[str], chunk: int = 256) -> torch.Tensor:
    """L2-normalised CLIP text embeddings [len(labels), D] (float32) of "a photo of a {label}."."""
    device = next(clip.parameters()).device
    with torch.no_grad():
        return torch.cat([
            clip.encode_text(tokenizer([TEMPLATE.format(label) for label in labels[i : i + chunk]]).to(device), normalize=True).float()
            for i in range(0, len(labels), chunk)
        ])


def zero_shot_logits(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """[B, D] image embeddings x [C, D] normalised label embeddings -> [B, C] logits
    (``logit_scale`` is CLIP's parameter, the log of the scale)."""
    image = nn.functional.normalize(image_embeddings.float(), dim=-1)
    return logit_scale.detach().exp().float() * image @ text_embeddings.float().T
