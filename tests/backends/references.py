"""Reference computations the LLM backends' tests share, written with transformers' models only."""

from __future__ import annotations

import torch


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
