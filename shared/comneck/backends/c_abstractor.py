"""Honeybee's C-Abstractor: the connector of Honeybee-C-7B-M144 (kakaobrain/honeybee).

It turns CLIP ViT-L/14 patch features into LLM input embeddings. The features come from
block 24 without ln_post, with CLS dropped: [B, 256, 1024]. The steps are: add a learned
positional embedding; lay the tokens out on a 16x16 grid; run a RegNet stage; average-pool
to 12x12; run a second stage; flatten to 144 tokens; apply an MLP readout (Linear, SiLU,
Linear) to the LLM width (4096). Learned eos tokens may follow.

Source: ``honeybee/projectors.py`` ``CAbstractor`` at 77686f0, the code the checkpoints
were released with. The stages are timm's ``RegStage``, built with Honeybee's arguments
(stride 1, SiLU, ``LayerNorm2d``). Inside ``ConvNormAct`` timm swaps ``LayerNorm2d`` for
``LayerNormAct2d``, whose eps is 1e-5, not LayerNorm2d's 1e-6. timm 1.0.31 (our lock)
builds the same keys as timm 0.9.8 (Honeybee's pin) and gives the same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from ..errors import ComneckInputError, ErrorCode
from ..importers.fitting import fit

PREFIX = "abstractor."


class CAbstractor(nn.Module):
    """CLIP patch features [B, grid_in², encoder_width] -> LLM tokens
    [B, grid_out² + num_eos_tokens, llm_hidden]. The defaults are Honeybee-C-7B-M144's sizes."""

    def __init__(
        self,
        *,
        encoder_width: int = 1024,
        hidden_size: int = 1024,
        grid_in: int = 16,
        grid_out: int = 12,
        depth: int = 3,
        mlp_depth: int = 2,
        llm_hidden: int = 4096,
        pos_emb: bool = True,
        num_eos_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.encoder_width, self.grid_in = encoder_width, grid_in
        self.num_tokens = grid_out**2 + num_eos_tokens  # what forward returns per image
        # Holds only the patch rows. Release-era checkpoints also carry a CLS row, which
        # load_abstractor_state drops.
        self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, grid_in**2, encoder_width), std=0.02)) if pos_emb else None
        stage = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        self.net = nn.Sequential(
            stage(depth, encoder_width, hidden_size), nn.AdaptiveAvgPool2d((grid_out, grid_out)), stage(depth, hidden_size, hidden_size)
        )
        layers: list[nn.Module] = [nn.Linear(hidden_size, llm_hidden)]
        for _ in range(mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(llm_hidden, llm_hidden)]
        self.readout = nn.Sequential(*layers)
        self.eos_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, num_eos_tokens, llm_hidden), std=0.02)) if num_eos_tokens else None

    @classmethod
    def from_config(
        cls, visual_projector_config: Mapping[str, Any], *, num_query_tokens: int | None = None, llm_hidden: int = 4096, grid_in: int = 16
    ) -> "CAbstractor":
        """Build from a release-era config.json's ``visual_projector_config``. ``num_query_tokens``
        is config.json's top-level key, used when the projector config lacks ``num_queries``.
        Missing keys take the release-era code's defaults, including ``num_eos_tokens`` = 1 and
        ``pos_emb`` = False. Settings this module does not implement are refused."""
        config = dict(visual_projector_config)

        def refuse(why: str) -> ComneckInputError:
            return ComneckInputError(f"Honeybee visual_projector_config: {why}", ErrorCode.BAD_WEIGHTS)

        def size(key: str, default: int | None = None, least: int = 1) -> int:
            value = config.get(key, default)
            if value is None:
                raise refuse(f"{key} is missing")
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise refuse(f"{key} must be an integer >= {least}, got {value!r}")
            return value

        if config.get("projector_type", "resampler") != "c-abs":
            raise refuse(f"projector_type {config.get('projector_type', 'resampler')!r} is not 'c-abs'")
        if config.get("prenorm", False):
            raise refuse("prenorm is true: only C-Abstractors without prenorm (as in M144) are supported")
        if config.get("feature_layer_index", -1) != -1:
            raise refuse(f"feature_layer_index {config['feature_layer_index']!r}: only -1 (the last CLIP block) is supported")
        if not isinstance(config.get("pos_emb", False), bool):
            raise refuse(f"pos_emb must be true or false, got {config['pos_emb']!r}")
        queries = size("num_queries", num_query_tokens)
        if num_query_tokens is not None and queries != num_query_tokens:
            raise refuse(f"num_queries {queries} differs from num_query_tokens {num_query_tokens}")
        grid_out = math.isqrt(queries)
        if grid_out**2 != queries:
            raise refuse(f"num_queries {queries} is not a square number")
        return cls(
            encoder_width=size("encoder_hidden_size", 1024),
            hidden_size=size("hidden_size", 1024),
            grid_in=grid_in,
            grid_out=grid_out,
            depth=size("depth"),
            mlp_depth=size("mlp_depth"),
            llm_hidden=llm_hidden,
            pos_emb=config.get("pos_emb", False),
            num_eos_tokens=size("num_eos_tokens", 1, least=0),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project the patch features: add positions, apply stage 1, pool, apply stage 2 and the readout, then append eos tokens."""
        tokens = self.grid_in**2
        if features.ndim != 3 or tuple(features.shape[1:]) != (tokens, self.encoder_width):
            raise ComneckInputError(
                f"the C-Abstractor takes CLIP patch features [B, {tokens}, {self.encoder_width}] (CLS dropped), got {list(features.shape)}",
                ErrorCode.INVALID_INPUT,
            )
        batch = features.shape[0]
        # out of place: Honeybee's own `x += pos_emb` changes the caller's tensor
        x = features if self.pos_emb is None else features + self.pos_emb
        x = x.transpose(1, 2).reshape(batch, self.encoder_width, self.grid_in, self.grid_in)  # token i = row i // grid, column i % grid
        x = self.readout(self.net(x).flatten(2).transpose(1, 2))
        if self.eos_tokens is not None:
            x = torch.cat([x, self.eos_tokens.expand(batch, -1, -1)], dim=1)
        return x


def load_abstractor_state(module: CAbstractor, state: Mapping[str, torch.Tensor]) -> None:
    """Copy the ``abstractor.*`` entries of a Honeybee state dict into ``module``; other entries
    (vision_model.*, language_model.*) are ignored. A release-era pos_emb has one extra leading
    row for CLS. The release code adds that row to CLS and then drops CLS, so it is dropped here
    too. Missing, unexpected or mis-shaped keys are refused on one line (``bad_weights``)."""
    own = {key: value for key, value in state.items() if key.startswith(PREFIX)}
    pos = own.get(PREFIX + "pos_emb")
    if module.pos_emb is not None and pos is not None and tuple(pos.shape) == (1, module.pos_emb.shape[1] + 1, module.pos_emb.shape[2]):
        own[PREFIX + "pos_emb"] = pos[:, 1:]
    fit(nn.ModuleDict({PREFIX[:-1]: module}), own, "Honeybee C-Abstractor")
