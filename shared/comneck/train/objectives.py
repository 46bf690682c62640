"""Loss terms and the stage plan of each scenario (DESIGN §1).

* ``dist``: MSE between the student's and the teacher's CLIP features (``cls``: the projected
  CLS embedding, as the official code; ``tokens``: every token at one block).
* ``ce``: cross-entropy of CLIP's zero-shot head: scaled cosine similarity of the student's
  image embedding with frozen text embeddings of the class prompts.
* ``rate``: bits per pixel from the codec's likelihoods.
* ``mse``: MSE(x, x_hat) on the 0..255 scale, as CompressAI's rate-distortion loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..zero_shot import zero_shot_logits
from .config import TrainConfig

#: Which networks a stage updates: the neck, the whole codec, the codec but g_s, the U-Net.
Part = str


@dataclass(frozen=True)
class Stage:
    """One stage of a scenario's recipe: what trains and how each loss term is weighted."""

    name: str
    trains: tuple[Part, ...]
    ce: float = 0.0
    dist: float = 0.0
    rate: float = 0.0
    mse: float = 0.0


def stage_plan(config: TrainConfig) -> list[Stage]:
    """The three stages of ``config.scenario``.

    d1 and postproc: the progressive schedule (CE; CE + 100 dist; 100 dist), all times the
    loss scale. d2 and d3: (i) L_dist with the codec frozen, (ii) codec and neck jointly with
    R + lambda (gamma MSE + beta L_dist) (d2) or R + lambda L_dist (d3, g_s untouched),
    (iii) the neck alone with L_dist.
    """
    s, w = config.loss.scale, config.loss
    student = "unet" if config.scenario == "postproc" else "neck"
    if config.scenario in ("d1", "postproc"):
        return [
            Stage("ce", (student,), ce=s * w.ce_weight),
            Stage("ce+dist", (student,), ce=s, dist=s * w.dist_weight),
            Stage("dist", (student,), dist=s * w.dist_weight),
        ]
    lam = config.lmbda
    l_dist = s * w.dist_weight  # L_dist means the same term in every stage: the official code's 11.52 x 100 x MSE
    if config.scenario == "d2":
        joint = Stage("joint-d2", ("neck", "codec"), dist=lam * w.beta * l_dist, rate=1.0, mse=lam * w.gamma)
    else:
        joint = Stage("joint-d3", ("neck", "codec-encoder"), dist=lam * l_dist, rate=1.0)
    return [Stage("neck", ("neck",), dist=s * w.dist_weight), joint, Stage("neck-finetune", ("neck",), dist=s * w.dist_weight)]


def bits_per_pixel(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated rate: sum of -log2 p over every latent, per image pixel (batch total / pixels)."""
    bits = sum(torch.log(lk).sum() for lk in likelihoods.values())
    return -bits / (math.log(2) * num_pixels)


class ZeroShotHead(nn.Module):
    """CLIP's zero-shot classifier over the class names (:mod:`comneck.zero_shot`) as a module of frozen buffers."""

    def __init__(self, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("text", nn.functional.normalize(text_embeddings.float(), dim=-1))
        self.register_buffer("logit_scale", logit_scale.detach().float())

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(image_embedding, self.text, self.logit_scale)


@dataclass
class Terms:
    """The loss terms of one step (unweighted) and their weighted sum."""

    total: torch.Tensor
    values: dict[str, float]


def combine(stage: Stage, ce: torch.Tensor | None, dist: torch.Tensor, rate: torch.Tensor | None, mse: torch.Tensor | None) -> Terms:
    """Weighted sum of the terms this stage uses; ``values`` keeps each term for the log."""
    total = stage.dist * dist
    values = {"dist": dist.item()}
    for name, weight, term in (("ce", stage.ce, ce), ("bpp", stage.rate, rate), ("mse", stage.mse, mse)):
        if term is not None:
            values[name] = term.item()
            if weight:
                total = total + weight * (term * 255.0**2 if name == "mse" else term)
    values["loss"] = total.item()
    return Terms(total, values)
